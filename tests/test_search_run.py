"""End-to-end searches on a tiny random LLaMA with a local Ray: every run file, results that match the
pruning core computed independently, SIGKILL of the driver + --resume, a killed actor, a per-candidate
timeout, and export -> `pruning_core scorers` -> `prune --scorer` equal to `prune --formula`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import make_tiny_model

from fitness.setup import EvaluatorSettings, build_evaluator
from metric_search import cluster, rundir
from metric_search.cli import main
from metric_search.config import ExecutionSettings, SearchSettings
from metric_search.dispatch import EvaluatorPool, Job
from metric_search.report import write_report
from metric_search.results import load_run
from metric_search.search import Search, start_run
from primitives.scorer import FormulaScorer
from pruning_core.cli_common import run_cli
from pruning_core.data import load_rows, tokenize_corpus
from pruning_core.models import load_model
from pruning_core.perplexity import make_windows, perplexity
from pruning_core.plugins import validate_plugin
from pruning_core.pruning import calibrate_and_prune
from pruning_core.scorers import SparsitySpec, get_scorer

SEARCH_FLAGS = ["--nsamples", "4", "--seqlen", "32", "--fitness-windows", "2", "--fitness-seqlen", "32",
                "--population", "10", "--seed", "7", "--confirm", "2", "--seed-formulas", "abs(W) * X"]  # fmt: skip
RUN_FILES = ["config.json", "checkpoint.json", "generations.jsonl", "candidates.jsonl", "hall_of_fame.json",
             "fitness.png", "pareto.png", "report.md"]  # fmt: skip


@pytest.fixture(scope="module")
def model_path(tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("search-model") / "tiny-llama"
    make_tiny_model("llama", 0).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, model_path) -> Path:
    """Statistics computed once here, so actors only load them."""
    root = tmp_path_factory.mktemp("search-cache")
    build_evaluator(evaluator_settings(model_path, root))
    return root


@pytest.fixture(scope="module")
def local_ray():
    import ray

    started = cluster.connect(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


def evaluator_settings(model_path, cache) -> EvaluatorSettings:
    return EvaluatorSettings(model=str(model_path), cache_dir=str(cache), nsamples=4, calib_seqlen=32,
                             fitness_windows=2, fitness_seqlen=32)  # fmt: skip


def search_settings(model_path, cache, generations: int) -> SearchSettings:
    return SearchSettings(generations=generations, population=10, seed=7, confirm=2,
                          seed_formulas=("abs(W) * X",), evaluator=evaluator_settings(model_path, cache))  # fmt: skip


def run_in_process(settings, run_dir: Path, workers: int = 1, observer=None):
    execution = ExecutionSettings(workers=workers, progress=False)
    start_run(settings, run_dir, run_dir.name, execution)
    search = Search(settings, execution, run_dir, observer)
    state = search.run()
    write_report(run_dir, load_run(run_dir).config, state)
    return search, state


def outcome(run_dir: Path) -> dict:
    """What must not depend on interruptions: the hall of fame, every result, the last population."""
    run = load_run(run_dir)
    results = {
        k: tuple(e[f] and e[f]["fitness"] for f in ("proxy", "ppl")) for k, e in run.state.candidates.items()
    }
    hall = json.loads((run_dir / rundir.HALL_OF_FAME).read_text())
    return {"hall": hall["entries"], "baselines": hall["baselines"], "results": results,
            "population": run.state.population, "generation": run.state.generation}  # fmt: skip


def one_shot_ppl(model_path, cache, formula: str) -> float:
    """The pruning core's one-shot pruning with the formula, then perplexity: no fitness code involved."""
    model, tokenizer = load_model(str(model_path))
    calibrate_and_prune(model, FormulaScorer(formula), SparsitySpec(0.5),
                        tokenize_corpus(tokenizer, load_rows("c4")), nsamples=4, seqlen=32, seed=0,
                        calib_name="c4", cache_root=Path(cache), sequential=False, progress=False)  # fmt: skip
    windows = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-valid")), 32, 2)
    return perplexity(model, windows, progress=False)["ppl"]


@pytest.fixture(scope="module")
def three_generations(local_ray, model_path, cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "three"
    run_in_process(search_settings(model_path, cache, 3), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def reference(local_ray, model_path, cache, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    run_in_process(search_settings(model_path, cache, 6), run_dir)
    return outcome(run_dir)


def test_three_generations_write_every_file(three_generations, model_path, cache):
    run_dir = three_generations
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)
    generations = [json.loads(line) for line in (run_dir / rundir.GENERATIONS).read_text().splitlines()]
    assert [g["generation"] for g in generations] == [0, 1, 2]
    rows = [json.loads(line) for line in (run_dir / rundir.CANDIDATES).read_text().splitlines()]
    pairs = [(r["canonical"], r["fidelity"]) for r in rows]
    assert len(pairs) == len(set(pairs))  # every canonical form is evaluated once per fidelity
    logged = {(r["canonical"], r["fidelity"]): r["fitness"] for r in rows}
    state = load_run(run_dir).state
    for key, entry in state.candidates.items():
        for fidelity in ("proxy", "ppl"):
            if entry[fidelity] is not None:
                expected = logged[(key, fidelity)]
                assert entry[fidelity]["fitness"] == (float("inf") if expected == "inf" else expected)

    hall = json.loads((run_dir / rundir.HALL_OF_FAME).read_text())
    ppls = [e["ppl"] for e in hall["entries"]]
    assert ppls == sorted(ppls) and len(ppls) >= 2
    confirmed = [logged[(k, "ppl")] for k in state.candidates if isinstance(logged.get((k, "ppl")), float)]
    assert ppls[0] == min(confirmed)
    best = hall["entries"][0]["formula"]
    assert ppls[0] == pytest.approx(one_shot_ppl(model_path, cache, best), rel=1e-6)
    assert hall["baselines"]["wanda"]["ppl"] == pytest.approx(
        one_shot_ppl(model_path, cache, "abs(W) * X"), rel=1e-6
    )

    report = (run_dir / rundir.REPORT).read_text()
    assert f"`{best}`" in report
    for name in ("wanda", "magnitude", "pruner-zero"):
        assert f"| {name} |" in report
    import matplotlib.image

    for plot in (rundir.FITNESS_PLOT, rundir.PARETO_PLOT):
        image = matplotlib.image.imread(run_dir / plot)
        assert image.shape[0] > 100 and image.shape[1] > 100


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_leftovers(processes: list[psutil.Process]) -> None:
    """Ray helpers that outlive a SIGKILLed driver (its agents), ended by pid."""
    time.sleep(1)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "metric_search", *args]


def test_sigkill_after_generation_one_then_resume_gives_the_same_run(
    reference, model_path, cache, tmp_path, capsys
):
    run_dir = tmp_path / "killed"
    command = cli("--model", str(model_path), "--cache-dir", str(cache), *SEARCH_FLAGS, "--generations", "6",
                  "--workers", "1", "--run-dir", str(run_dir), "--quiet")  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at, helpers = None, []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        helpers = descendants(proc.pid) or helpers
        try:
            generation = json.loads((run_dir / rundir.CHECKPOINT).read_text())["generation"]
        except (OSError, ValueError, KeyError):
            generation = -1
        if generation >= 1:
            proc.send_signal(signal.SIGKILL)
            killed_at = generation
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    stop_leftovers(helpers)
    assert killed_at is not None and killed_at < 5, (killed_at, proc.stderr.read()[-2000:])

    # The resume runs the CLI in this process, on the module's Ray (a second Ray start costs ~10 s).
    assert run_cli(main, ["--resume", str(run_dir), "--workers", "1", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generations"] == 6
    assert outcome(run_dir) == reference
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)


def test_killed_actor_mid_generation_gives_the_same_run(reference, model_path, cache, tmp_path):
    killed = []

    def kill_a_busy_actor(event, **info):
        if event == "result" and info["label"] != "baselines" and not killed:
            pool = info["pool"]
            target = (pool.where(busy_only=True) or pool.where())[0]
            os.kill(target["pid"], signal.SIGKILL)
            killed.append(target)

    run_dir = tmp_path / "actor-killed"
    search, _ = run_in_process(search_settings(model_path, cache, 6), run_dir, workers=2,
                               observer=kill_a_busy_actor)  # fmt: skip
    assert killed and search.actors_replaced >= 1
    assert outcome(run_dir) == reference


def test_a_candidate_past_its_deadline_is_a_timeout_and_its_actor_is_replaced(local_ray, model_path, cache):
    pool = EvaluatorPool(evaluator_settings(model_path, cache).as_dict(), 1, 1, False, hard_timeout=0.0)
    try:
        results = pool.run([Job("abs(W) * X", "ppl")])
        assert results[0]["reason"] == "timeout" and results[0]["fitness"] == float("inf")
        assert pool.replaced == 1
    finally:
        pool.shutdown()


def test_export_is_listed_and_prunes_like_the_formula(three_generations, model_path, cache, tmp_path):
    plugins = tmp_path / "plugins"
    exported = subprocess.run(cli("export", str(three_generations), "--top", "2", "--dir", str(plugins),
                                  "--name", "found", "--json"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-2000:]
    hall = json.loads((three_generations / rundir.HALL_OF_FAME).read_text())
    run = load_run(three_generations)
    for rank in (1, 2):
        data = json.loads((plugins / f"found-{rank}.json").read_text())
        assert validate_plugin(data, "test") == data
        entry = hall["entries"][rank - 1]
        assert data["formula"] == entry["formula"] and data["group"] == "row"
        assert data["stats"] == list(FormulaScorer(entry["formula"]).stats)
        assert data["provenance"]["fitness"] == entry["ppl"]
        assert data["provenance"]["run_id"] == run.config["run_id"] and data["provenance"]["seed"] == 7

    def core(*args):
        proc = subprocess.run([sys.executable, "-m", "pruning_core", *args], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    listed = {row["name"]: row for row in core("scorers", "--plugins", str(plugins), "--json")["scorers"]}
    assert listed["found-1"]["kind"] == "plugin" and listed["found-2"]["kind"] == "plugin"
    prune = ["prune", "--model", str(model_path), "--cache-dir", str(cache), "--nsamples", "4", "--seqlen", "32",
             "--eval", "wikitext2-valid", "--max-windows", "2", "--json"]  # fmt: skip
    by_name = core(*prune, "--plugins", str(plugins), "--scorer", "found-1")
    by_text = core(*prune, "--formula", hall["entries"][0]["formula"])
    assert by_name["ppl"] == by_text["ppl"]


def test_validate_fills_the_test_table_like_the_sequential_driver(
    three_generations, model_path, cache, capsys
):
    argv = ["validate", str(three_generations), "--top", "1", "--patterns", "2:4", "--baselines", "wanda",
            "--nsamples", "4", "--seqlen", "32", "--max-windows", "2", "--cache-dir", str(cache), "--json"]  # fmt: skip
    assert run_cli(main, argv) == 0
    cells = {(c["metric"], c["pattern"]): c["ppl"] for c in json.loads(capsys.readouterr().out)["cells"]}
    best = json.loads((three_generations / rundir.HALL_OF_FAME).read_text())["entries"][0]["formula"]
    assert set(cells) == {
        (f"#1 `{best}`", "2:4"),
        ("wanda", "2:4"),
    }

    model, tokenizer = load_model(str(model_path))
    calibrate_and_prune(model, get_scorer("wanda"), SparsitySpec(0.5, 2, 4), tokenize_corpus(tokenizer, load_rows("c4")),
                        nsamples=4, seqlen=32, seed=0, calib_name="c4", cache_root=Path(cache), progress=False)  # fmt: skip
    windows = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-test")), 32, 2)
    assert cells[("wanda", "2:4")] == pytest.approx(
        perplexity(model, windows, progress=False)["ppl"], rel=1e-6
    )
    table = (three_generations / rundir.VALIDATION).read_text()
    assert "| metric | 2:4 |" in table and "| wanda |" in table and f"`{best}`" in table
