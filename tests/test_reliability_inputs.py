"""Bad input to both command lines, one test each: exit code 2, exactly one clear line on stderr, no
traceback, and nothing written: an existing run directory stays byte-for-byte the same, no new run
directory appears, and no hostile formula gets to create its marker file."""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from search_fixtures import search_settings

from metric_search.cli import main as search_main
from metric_search.config import ExecutionSettings
from metric_search.search import start_run
from pruning_core.cli import main as core_main
from pruning_core.cli_common import run_cli
from pruning_core.scorers import base

pytestmark = pytest.mark.reliability

MARKER = "pwned"  # hostile formulas try to create this file in the working folder
SPARSITY = "--sparsity must be a number in (0, 1)"
PATTERN_ORDER = "needs 0 < N < M"

HOSTILE_FORMULAS = {
    "import-call": (f"__import__('os').system('touch {MARKER}')", "dunder names"),
    "import-statement": ("import os", "unknown name 'import'"),
    "attribute": (f"W.__class__.__init__.__globals__['os'].system('touch {MARKER}')", "attribute access"),
    "dunder": ("__builtins__", "dunder names"),
    "lambda": ("lambda: W", "unknown name 'lambda'"),
    "open": (f"open('{MARKER}', 'w')", "unknown name 'open'"),
    "huge": ("W+" * 2500 + "W", "4096-byte limit"),
    "deep": ("(" * 100 + "W" + ")" * 100, "nests deeper than 64"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Search flags that are wrong whether a run starts or resumes: (flags, what the one line must say).
SEARCH_FLAGS = {
    "sparsity-0": (["--sparsity", "0"], SPARSITY),
    "sparsity-1": (["--sparsity", "1"], SPARSITY),
    "sparsity-negative": (["--sparsity", "-0.5"], SPARSITY),
    "sparsity-1.5": (["--sparsity", "1.5"], SPARSITY),
    "sparsity-nan": (["--sparsity", "nan"], SPARSITY),
    "pattern-3:2": (["--pattern", "3:2"], PATTERN_ORDER),
    "pattern-0:4": (["--pattern", "0:4"], PATTERN_ORDER),
    "pattern-a:b": (["--pattern", "a:b"], "--pattern must look like N:M"),
    "unknown-seed-name": (["--seed-formulas", "wanda,nope"], "unknown name 'nope'"),
    "unknown-statistic": (["--seed-formulas", "abs(W) * Q"], "unknown name 'Q'"),
    "fractional-power": (["--seed-formulas", "W^0.3"], "0.3"),
    **{f"hostile-{name}": (["--seed-formulas", text], words) for name, (text, words) in HOSTILE_FORMULAS.items()},
    "workers-0": (["--workers", "0"], "--workers must be >= 1"),
    "generations-0": (["--generations", "0"], "--generations must be >= 1"),
    "population-1": (["--population", "1"], "--population must be >= 2"),
    "tournament-0": (["--tournament", "0"], "--tournament must be between"),
    "init-depth": (["--init-depth", "3"], "--init-depth must be MIN:MAX"),
    "group": (["--group", "column"], "unknown --group 'column'"),
    "calib": (["--calib", "nope"], "unknown --calib 'nope'"),
    "update-refit": (["--update", "refit"], "refit is too slow for the fitness loop"),
    "update-unknown": (["--update", "magic"], "--update 'magic' is not available to the search"),
    "unknown-flag": (["--bogus"], "unrecognized arguments: --bogus"),
    "address-malformed": (["--address", "nowhere"], "--address must be 'auto' or HOST:PORT"),
}  # fmt: skip


@pytest.fixture
def workspace(tmp_path, monkeypatch, search_model) -> Path:
    """The working folder, holding runs/existing: a run as `python -m metric_search` starts it. Its cache
    folder is outside: a cache is not part of a run."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    settings = search_settings(search_model, tmp_path / "cache", generations=2, population=4)
    start_run(settings, work / "runs" / "existing", "existing", ExecutionSettings())
    return work


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))
    }


def assert_refused(capfd, workspace: Path, main, argv: list[str], words: str) -> None:
    before = snapshot(workspace)
    code = run_cli(main, argv)
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert snapshot(workspace) == before
    assert not (workspace / MARKER).exists()


def new_run(workspace: Path, model: Path, *flags: str) -> list[str]:
    cache = workspace.parent / "cache"
    return ["--model", str(model), "--cache-dir", str(cache), "--nsamples", "4", "--seqlen", "32",
            "--fitness-windows", "2", "--fitness-seqlen", "32", "--run-dir", "runs/new", "--quiet", *flags]  # fmt: skip


# --- metric_search -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(SEARCH_FLAGS))
def test_bad_flag_for_a_new_run(case, workspace, search_model, capfd):
    flags, words = SEARCH_FLAGS[case]
    assert_refused(capfd, workspace, search_main, new_run(workspace, search_model, *flags), words)


@pytest.mark.parametrize("case", sorted(SEARCH_FLAGS))
def test_bad_flag_for_a_resume(case, workspace, capfd):
    flags, words = SEARCH_FLAGS[case]
    assert_refused(capfd, workspace, search_main, ["--resume", "runs/existing", "--quiet", *flags], words)


RUNTIME_ENVS = {
    "missing": (None, "cannot read it"),
    "not-json": ("{pip: [x]", "is not JSON"),
    "not-an-object": ('["metric-search"]', "holds a JSON list, not an object"),
    "not-a-runtime-env": ('{"pip": 3}', "is not a valid Ray runtime_env"),
}


@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
@pytest.mark.parametrize("case", sorted(RUNTIME_ENVS))
def test_bad_runtime_env_file(case, resume, workspace, search_model, capfd):
    text, words = RUNTIME_ENVS[case]
    path = workspace.parent / f"{case}.json"
    if text is not None:
        path.write_text(text)
    flags = ["--runtime-env", str(path)]
    argv = (
        ["--resume", "runs/existing", "--quiet", *flags]
        if resume
        else new_run(workspace, search_model, *flags)
    )
    assert_refused(capfd, workspace, search_main, argv, words)


@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
def test_address_where_nothing_listens_fails_fast(resume, workspace, search_model, capfd):
    flags = ["--address", f"127.0.0.1:{free_port()}"]
    argv = ["--resume", "runs/existing", *flags] if resume else new_run(workspace, search_model, *flags)
    started = time.monotonic()
    assert_refused(capfd, workspace, search_main, argv, "nothing answers at --address")
    assert time.monotonic() - started < 30


def test_address_that_never_answers_fails_within_30_s(workspace, search_model, capfd):
    # TEST-NET-1 (RFC 5737): reserved for documentation, routed nowhere; a connect can only time out.
    started = time.monotonic()
    argv = new_run(workspace, search_model, "--address", "192.0.2.1:6379")
    assert_refused(capfd, workspace, search_main, argv, "nothing answers at --address")
    assert time.monotonic() - started < 30


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, search_model) -> Path:
    """Folders and files that are not a usable decoder."""
    import transformers as tf

    root = tmp_path_factory.mktemp("bad-models")
    (root / "empty-dir").mkdir()
    shutil.copytree(search_model, root / "truncated-weights")
    weights = root / "truncated-weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    shutil.copytree(search_model, root / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    # GPT-2's blocks hold Conv1D, not nn.Linear: a causal LM in which no decoder block can be found.
    config = tf.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                           eos_token_id=0)  # fmt: skip
    tf.GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(search_model / name, root / "gpt2" / name)
    return root


MODELS = {
    "missing": ("missing", "is neither an embedded name"),
    "file": ("truncated-weights/config.json", "is a file, not a model directory"),
    "empty-dir": ("empty-dir", "is a folder without config.json, not a model directory"),
    "truncated-weights": ("truncated-weights", "could not load model"),
    "no-weights": ("no-weights", "could not load model"),
    "no-decoder-blocks": ("gpt2", "no decoder blocks found in GPT2LMHeadModel"),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_model_that_is_missing_or_not_a_decoder(case, workspace, bad_models, capfd):
    name, words = MODELS[case]
    assert_refused(capfd, workspace, search_main, new_run(workspace, bad_models / name), words)


def damaged_run(workspace: Path, config: bytes | None, checkpoint: bytes) -> str:
    folder = workspace / "runs" / "damaged"
    folder.mkdir()
    existing = workspace / "runs" / "existing"
    (folder / "config.json").write_bytes(
        config if config is not None else (existing / "config.json").read_bytes()
    )
    (folder / "checkpoint.json").write_bytes(checkpoint)
    return "runs/damaged"


RESUMES = {
    "missing": (lambda w: "runs/missing", [], "does not exist"),
    "file": (lambda w: "runs/existing/config.json", [], "is a file, not a run directory"),
    "empty-dir": (lambda w: (w / "runs" / "empty").mkdir() or "runs/empty", [], "is not a metric_search run"),
    "config-not-json": (lambda w: damaged_run(w, b"{oops", b"{}"), [], "is not a valid metric_search config"),
    "checkpoint-not-json": (lambda w: damaged_run(w, None, b"\x00\x01"), [], "is not a valid checkpoint"),
    "other-model": (lambda w: "runs/existing", ["--model", "other/model"], "--model other/model differs"),
    "other-population": (lambda w: "runs/existing", ["--population", "99"], "--population 99 differs"),
    "with-run-dir": (lambda w: "runs/existing", ["--run-dir", "runs/new"], "either --resume RUN_DIR or --run-dir"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RESUMES))
def test_resume_of_something_that_is_not_this_run(case, workspace, capfd):
    target, flags, words = RESUMES[case]
    argv = ["--resume", target(workspace), "--quiet", *flags]
    assert_refused(capfd, workspace, search_main, argv, words)


def test_new_run_into_an_existing_run_directory(workspace, search_model, capfd):
    argv = ["--model", str(search_model), "--run-dir", "runs/existing", "--quiet"]
    assert_refused(capfd, workspace, search_main, argv, "already exists and is not empty")


@pytest.mark.parametrize("command", ["export", "validate"])
def test_export_or_validate_of_a_folder_that_is_not_a_run(command, workspace, capfd):
    (workspace / "runs" / "empty").mkdir()
    argv = [command, "runs/empty", *(["--dir", "plugins-out"] if command == "export" else [])]
    assert_refused(capfd, workspace, search_main, argv, "is not a metric_search run")


# --- pruning_core prune / scorers ----------------------------------------------------------------


PRUNE_FLAGS = {
    "sparsity-0": (["--formula", "abs(W)", "--sparsity", "0"], SPARSITY),
    "sparsity-1.5": (["--formula", "abs(W)", "--sparsity", "1.5"], SPARSITY),
    "pattern-3:2": (["--formula", "abs(W)", "--pattern", "3:2"], PATTERN_ORDER),
    "pattern-0:4": (["--formula", "abs(W)", "--pattern", "0:4"], PATTERN_ORDER),
    "pattern-a:b": (["--formula", "abs(W)", "--pattern", "a:b"], "--pattern must look like N:M"),
    "unknown-scorer": (["--scorer", "nope"], "unknown scorer 'nope'"),
    "scorer-and-formula": (["--scorer", "wanda", "--formula", "abs(W)"], "pass exactly one of --scorer"),
    "unknown-statistic": (["--formula", "abs(W) * Q"], "unknown name 'Q'"),
    "unknown-update": (["--scorer", "wanda", "--update", "magic"], "unknown update 'magic'"),
    **{f"hostile-{name}": (["--formula", text], words) for name, (text, words) in HOSTILE_FORMULAS.items()},
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PRUNE_FLAGS))
def test_bad_prune_flag(case, workspace, search_model, isolated_plugins, capfd):
    flags, words = PRUNE_FLAGS[case]
    argv = ["prune", "--model", str(search_model), "--nsamples", "2", "--seqlen", "32", *flags]
    assert_refused(capfd, workspace, core_main, argv, words)


def plugin(**changes) -> dict:
    data = {"format": "metric-search-scorer", "version": 1, "name": "mine", "formula": "abs(W) * X",
            "stats": ["X"], "group": "row"}  # fmt: skip
    data.update(changes)
    return data


PLUGINS = {
    "not-json": (b"{'format': 'metric-search-scorer'", "is not valid JSON"),
    "not-text": (pickle.dumps({"name": "mine"}), "is not valid JSON"),
    "not-an-object": (b"[1, 2]", "is not a JSON object"),
    "code-like-fields": (json.dumps(plugin(code="import os", __reduce__="os.system")).encode(), "unexpected fields"),
    "wrong-version": (json.dumps(plugin(version=2)).encode(), "expected 'metric-search-scorer' version 1"),
    "wrong-format": (json.dumps(plugin(format="python")).encode(), "expected 'metric-search-scorer' version 1"),
    "missing-formula": (json.dumps({k: v for k, v in plugin().items() if k != "formula"}).encode(),
                        "lacks a valid 'formula' field"),
    "bad-name": (json.dumps(plugin(name="../../etc/passwd")).encode(), "has an invalid name"),
    "stats-mismatch": (json.dumps(plugin(stats=["G"])).encode(), "but its formula reads ['X']"),
    "unknown-statistic": (json.dumps(plugin(formula="abs(W) * Q")).encode(), "unknown name 'Q'"),
    "too-large": (json.dumps(plugin(description="x" * 70_000)).encode(), "is larger than 65536 bytes"),
}  # fmt: skip


@pytest.mark.parametrize("command", ["scorers", "prune"])
@pytest.mark.parametrize("case", sorted(PLUGINS))
def test_bad_plugin_file(case, command, workspace, search_model, isolated_plugins, capfd):
    folder = workspace / "plugins"
    folder.mkdir()
    content, words = PLUGINS[case]
    (folder / "mine.json").write_bytes(content)
    model = ["--model", str(search_model), "--nsamples", "2", "--seqlen", "32", "--scorer", "mine"]
    argv = [command, "--plugins", str(folder), *(model if command == "prune" else [])]
    assert_refused(capfd, workspace, core_main, argv, words)
    assert "mine" not in base._REGISTRY


def test_plugins_flag_that_is_not_a_folder(workspace, isolated_plugins, capfd):
    assert_refused(capfd, workspace, core_main, ["scorers", "--plugins", "nowhere"], "is not a directory")


# --- the real entry points -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [(["metric_search", "--workers", "0"], "--workers must be >= 1"),
     (["pruning_core", "prune", "--pattern", "0:4"], PATTERN_ORDER)],
    ids=["metric_search", "pruning_core"],
)  # fmt: skip
def test_console_entry_point_exits_2_with_one_line(argv, words, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []
