"""prune + eval + save + reload on tiny random configs of five architectures, through the CLI (run in
this process: a subprocess would spend most of each test importing torch; test_cli_errors runs the real
entry point)."""

from __future__ import annotations

import io
import json
import subprocess
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from conftest import ARCHS
from transformers import AutoModelForCausalLM

from pruning_core import cli, cli_common
from pruning_core.blocks import block_linears, find_blocks
from pruning_core.data import load_rows, tokenize_corpus
from pruning_core.models import load_model
from pruning_core.perplexity import make_windows, perplexity

CALIB = ["--calib", "c4", "--nsamples", "4", "--seqlen", "32", "--seed", "0"]
EVAL = ["--eval", "wikitext2-valid", "--max-windows", "3"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pruning_core ARGS`` in this process: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_common.run_cli(cli.main, list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def prune_json(model_dir, *extra):
    proc = run_cli("prune", "--model", str(model_dir), *CALIB, *EVAL, "--json", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_eval_save_reload(arch, tiny_model_dir, tmp_path, data_dir):
    model_dir = tiny_model_dir(arch)
    dense = json.loads(
        run_cli(
            "eval",
            "--model",
            str(model_dir),
            "--data",
            "wikitext2-valid",
            "--seqlen",
            "32",
            "--max-windows",
            "3",
            "--json",
        ).stdout
    )
    out = tmp_path / "pruned"
    result = prune_json(model_dir, "--scorer", "wanda", "--sparsity", "0.5", "--save", str(out))
    assert result["ppl"] != pytest.approx(dense["ppl"])
    assert all(v == pytest.approx(0.5) for v in result["per_linear"].values())
    record = json.loads((out / "pruning.json").read_text())
    assert record["scorer"] == "wanda" and record["ppl"] == pytest.approx(result["ppl"])

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    _, tokenizer = load_model(str(out))
    windows = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-valid", data_dir)), 32, 3)
    assert perplexity(reloaded, windows, progress=False)["ppl"] == pytest.approx(result["ppl"], rel=1e-6)
    _, blocks = find_blocks(reloaded)
    for block in blocks:
        for linear in block_linears(block).values():
            zeros_per_row = (linear.weight == 0).sum(dim=1)
            assert torch.all(zeros_per_row == round(0.5 * linear.in_features))
    embed = reloaded.get_input_embeddings().weight
    assert (embed == 0).float().mean() < 0.01  # embeddings are never pruned


@pytest.mark.parametrize(
    "scorer, extra", [("magnitude", []), ("ria", ["--pattern", "2:4"]), ("pruner-zero", ["--pattern", "4:8"])]
)
def test_other_scorers_and_patterns(scorer, extra, tiny_model_dir, tmp_path):
    result = prune_json(tiny_model_dir("llama"), "--scorer", scorer, *extra, "--cache-dir", str(tmp_path))
    assert result["sparsity"] == pytest.approx(0.5)
    assert result["ppl"] > 1


WALKS = {  # prune's flags -> the walk the core's driver must take (one-shot: every block from dense inputs)
    "two-pass": ((), {}),
    "one-pass": (("--one-pass",), {"one_pass": True}),
}


@pytest.mark.parametrize("walk", sorted(WALKS))
def test_prune_uses_the_sequential_driver_it_is_asked_for(walk, tiny_model_dir, tmp_path, data_dir):
    """``prune`` (two passes per block by default, one with ``--one-pass``) saves the weights
    ``prune_model`` gives on the same calibration windows with that walk, and they differ from the
    other walks' (the other sequential one, and one-shot from the dense model's statistics)."""
    from pruning_core.data import calibration_windows
    from pruning_core.scorers import SparsitySpec, get_scorer
    from pruning_core.sequential import Walk, prune_model

    model_dir = tiny_model_dir("llama")
    flags, _ = WALKS[walk]
    prune_json(model_dir, "--scorer", "wanda", *flags, "--save", str(tmp_path / "pruned"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval().state_dict()
    _, tokenizer = load_model(str(model_dir))
    windows = calibration_windows(tokenize_corpus(tokenizer, load_rows("c4", data_dir)), 4, 32, 0)
    walks = {name: Walk(progress=False, **options) for name, (_, options) in WALKS.items()}
    walks["one-shot"] = Walk(sequential=False, progress=False)
    weights = {}
    for name, how in walks.items():
        model = load_model(str(model_dir))[0]
        prune_model(model, get_scorer("wanda"), SparsitySpec(0.5), windows, walk=how)
        weights[name] = model.state_dict()
    for name, weight in weights[walk].items():
        assert torch.equal(saved[name], weight), name
    for other in set(walks) - {walk}:
        assert any(not torch.equal(w, weights[other][n]) for n, w in weights[walk].items()), other


# Each method's comparison group in its authors' released code (per row = one quota per output).
OFFICIAL_GROUPS = {
    "magnitude": "matrix",  # Wanda's magnitude baseline: one threshold per layer
    "wanda": "row",
    "ria": "matrix",  # per row only with --per_outneuron
    "z-pruner": "matrix",
    "pruner-zero": "row",  # Wanda's framework
    "sparsegpt": "matrix",  # block-wide adaptive selection over all rows
    "apt": "matrix",  # SparseGPT's selection
}


def test_scorers_lists_builtins_with_their_official_groups():
    proc = run_cli("scorers", "--json")
    groups = {row["name"]: row["default_group"] for row in json.loads(proc.stdout)["scorers"]}
    assert {name: groups.get(name) for name in OFFICIAL_GROUPS} == OFFICIAL_GROUPS


def eval_json(capsys, *args) -> dict:
    from pruning_core.cli import main

    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_with_tasks_only_skips_perplexity(tiny_model_dir, monkeypatch, capsys):
    import pruning_core.perplexity

    def no_perplexity(*_args, **_kwargs):
        raise AssertionError("perplexity computed although only --tasks was asked for")

    monkeypatch.setattr(pruning_core.perplexity, "perplexity", no_perplexity)
    result = eval_json(capsys, "--model", str(tiny_model_dir("llama")), "--tasks", "arc_easy", "--limit", "2")
    assert result["zeroshot"]["tasks"]["arc_easy"]["n"] == 2
    assert not {"ppl", "nll", "windows", "data", "seqlen"} & set(result)


def test_eval_without_tasks_computes_wikitext2_test_perplexity(tiny_model_dir, capsys, data_dir):
    model_dir = tiny_model_dir("llama")
    result = eval_json(capsys, "--model", str(model_dir), "--seqlen", "32", "--max-windows", "2")
    assert result["data"] == "wikitext2-test" and "zeroshot" not in result
    # independent: mean next-token NLL over the first two 32-token windows of WikiText-2 test
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    _, tokenizer = load_model(str(model_dir))
    windows = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-test", data_dir)), 32, 2)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result["windows"] == 2
    assert result["ppl"] == pytest.approx(torch.exp(nll).item(), rel=1e-5)
