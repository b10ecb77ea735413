"""End-to-end searches on a tiny random LLaMA with a local Ray: every run file, results that match the
pruning core computed independently, and export -> `pruning_core scorers` -> `prune --scorer` equal to
`prune --formula`. Faults (killed driver or actors, bad candidates) are in test_reliability_faults.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from search_fixtures import run_in_process, search_settings

from metric_search import rundir
from metric_search.cli import main
from metric_search.report import write_report
from metric_search.results import load_run
from primitives import canonical_key
from primitives.scorer import FormulaScorer
from pruning_core.cli_common import run_cli
from pruning_core.data import load_rows, tokenize_corpus
from pruning_core.models import load_model
from pruning_core.perplexity import make_windows, perplexity
from pruning_core.plugins import checked_plugin
from pruning_core.pruning import Calibration, calibrate_and_prune
from pruning_core.scorers import SparsitySpec, get_scorer
from pruning_core.zeroshot import evaluate_zeroshot

RUN_FILES = ["config.json", "checkpoint.json", "generations.jsonl", "candidates.jsonl", "hall_of_fame.json",
             "fitness.png", "pareto.png", "report.md"]  # fmt: skip


CALIBRATION = Calibration("c4", nsamples=4, seqlen=32, seed=0)  # the search fixtures' calibration


def spread_middles(total: int, count: int) -> list[int]:
    """The rule for the windows a search reads, written out: the middles of ``count`` equal slices."""
    return [(2 * j + 1) * total // (2 * count) for j in range(count)]


def one_shot_ppl(model_path, cache, formula: str, rung: str = "ppl") -> float:
    """The pruning core's one-shot pruning with the formula, then perplexity on the windows a rung reads
    (the top rung's 16 spread windows, or the base rung's first and middle one of them): no fitness code."""
    model, tokenizer = load_model(str(model_path))
    calibrate_and_prune(model, FormulaScorer(formula), SparsitySpec(0.5),
                        tokenize_corpus(tokenizer, load_rows("c4")), replace(CALIBRATION, sequential=False), cache_root=Path(cache), progress=False)  # fmt: skip
    corpus = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-valid")), 32)
    middles = spread_middles(corpus.shape[0], 16)
    read = middles if rung == "top" else [middles[0], middles[8]]
    return perplexity(model, corpus[read], progress=False)["ppl"]


@pytest.fixture(scope="module")
def three_generations(local_ray, search_model, search_cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "three"
    run_in_process(search_settings(search_model, search_cache, 3), run_dir)
    return run_dir


def test_three_generations_write_every_file(three_generations, search_model, search_cache):
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
        for fidelity in ("proxy", "ppl", "top"):
            if entry[fidelity] is not None:
                expected = logged[(key, fidelity)]
                assert entry[fidelity]["fitness"] == (float("inf") if expected == "inf" else expected)

    hall = json.loads((run_dir / rundir.HALL_OF_FAME).read_text())
    entries = hall["entries"]
    climbed = [e for e in entries if e["top"] is not None]
    assert climbed and entries[: len(climbed)] == climbed  # the top rung first, then the base rung
    assert [e["top"] for e in climbed] == sorted(e["top"] for e in climbed)
    assert [e["ppl"] for e in entries[len(climbed) :]] == sorted(e["ppl"] for e in entries[len(climbed) :])
    tops = [logged[(k, "top")] for k in state.candidates if isinstance(logged.get((k, "top")), float)]
    assert entries[0]["top"] == min(tops)
    best = entries[0]["formula"]
    assert entries[0]["ppl"] == pytest.approx(one_shot_ppl(search_model, search_cache, best), rel=1e-6)
    searched = load_run(run_dir).settings.evaluator
    assert (searched.fitness_windows, searched.top_windows) == (2, 16)  # what one_shot_ppl reads
    assert entries[0]["top"] == pytest.approx(one_shot_ppl(search_model, search_cache, best, "top"), rel=1e-6)
    assert hall["baselines"]["wanda"]["ppl"] == pytest.approx(
        one_shot_ppl(search_model, search_cache, "abs(W) * X"), rel=1e-6
    )

    # the final check: Wanda through the sequential driver on windows spread over those the search did not read
    run = load_run(run_dir)
    final, e = run.state.final, run.settings.evaluator
    measured = {
        key: tuple(entry[f] and entry[f]["fitness"] for f in ("proxy", "ppl", "top"))
        for key, entry in run.state.candidates.items()
    }
    hall_of_fame = run.state.hall_of_fame
    heads = [
        k for i, k in enumerate(hall_of_fame) if measured[k] not in {measured[h] for h in hall_of_fame[:i]}
    ]
    # a formula measured exactly as a better-ranked one (its twin) takes no final slot, nor does Wanda
    wanda = canonical_key("abs(W) * X")
    assert [r["formula"] for r in final["rows"]] == [k for k in heads if k != wanda][: run.settings.final_top]
    model, tokenizer = load_model(str(search_model))
    calibrate_and_prune(model, get_scorer("wanda"), SparsitySpec(0.5), tokenize_corpus(tokenizer, load_rows("c4")),
                        CALIBRATION, cache_root=Path(search_cache),
                        progress=False)  # fmt: skip
    corpus = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-valid")), 32)
    searched = set(spread_middles(corpus.shape[0], e.top_windows))
    rest = [i for i in range(corpus.shape[0]) if i not in searched]
    held_out = corpus[[rest[i] for i in spread_middles(len(rest), run.settings.final_windows)]]
    assert final["wanda"]["0.5"] == pytest.approx(
        perplexity(model, held_out, progress=False)["ppl"], rel=1e-6
    )
    for row in final["rows"]:
        assert row["ci"][0] <= row["ratio"] <= row["ci"][1]
    better = [r["ratio"] for r in final["rows"] if r["ci"][1] < 1.0]  # outside the noise
    assert final["chosen"]["ratio"] == min(better or [1.0])  # else Wanda, ratio 1

    report = (run_dir / rundir.REPORT).read_text()
    assert f"`{best}`" in report and "## Final check" in report and final["chosen"]["verdict"] in report
    assert final["window_indices"] == [rest[i] for i in spread_middles(len(rest), run.settings.final_windows)]
    assert "windows " + ", ".join(str(i) for i in final["window_indices"]) in report
    for name in ("wanda", "magnitude", "pruner-zero"):
        assert f"| {name} |" in report
    import matplotlib.image

    for plot in (rundir.FITNESS_PLOT, rundir.PARETO_PLOT):
        image = matplotlib.image.imread(run_dir / plot)
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_a_plot_is_redrawn_only_when_its_data_changed(three_generations, tmp_path):
    """The report follows every generation and the final check. A plot whose data did not change keeps its
    file (same inode: not rewritten); one whose data changed, or whose file is damaged, is drawn anew."""
    import shutil

    from PIL import Image

    run_dir = tmp_path / "run"
    shutil.copytree(three_generations, run_dir)
    run = load_run(run_dir)
    state = run.state
    fitness, pareto = run_dir / rundir.FITNESS_PLOT, run_dir / rundir.PARETO_PLOT

    def inodes():
        return fitness.stat().st_ino, pareto.stat().st_ino

    drawn = inodes()
    state.final = None  # the report changes, no plot does
    write_report(run_dir, run.config, state)
    assert inodes() == drawn and "Not run yet" in (run_dir / rundir.REPORT).read_text()

    state.history.append({**state.history[-1], "generation": state.generation + 1})
    write_report(run_dir, run.config, state)
    assert fitness.stat().st_ino != drawn[0] and pareto.stat().st_ino == drawn[1]
    entry = next(e for e in state.candidates.values() if e["ppl"] and e["ppl"]["reason"] is None)
    entry["ppl"] = {**entry["ppl"], "fitness": entry["ppl"]["fitness"] * 2}
    write_report(run_dir, run.config, state)
    assert pareto.stat().st_ino != drawn[1]

    drawn = inodes()
    fitness.write_bytes(b"not a png")
    write_report(run_dir, run.config, state)
    assert fitness.stat().st_ino != drawn[0] and pareto.stat().st_ino == drawn[1]
    with Image.open(fitness) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_export_is_listed_and_prunes_like_the_formula(
    three_generations, search_model, search_cache, tmp_path, capsys, isolated_plugins
):
    from pruning_core.cli import main as core_main

    def run(main, *args):
        assert run_cli(main, list(args)) == 0
        return json.loads(capsys.readouterr().out)

    plugins = tmp_path / "plugins"
    run(main, "export", str(three_generations), "--top", "2", "--dir", str(plugins), "--name", "found",
        "--json")  # fmt: skip
    hall = json.loads((three_generations / rundir.HALL_OF_FAME).read_text())
    run_record = load_run(three_generations)
    for rank in (1, 2):
        data = json.loads((plugins / f"found-{rank}.json").read_text())
        assert checked_plugin(data, "test") == data
        entry = hall["entries"][rank - 1]
        assert data["formula"] == entry["formula"] and data["group"] == "row"
        assert data["stats"] == list(FormulaScorer(entry["formula"]).stats)
        assert data["provenance"]["fitness"] == (entry["top"] if entry["top"] is not None else entry["ppl"])
        assert data["provenance"]["run_id"] == run_record.config["run_id"] and data["provenance"]["seed"] == 7

    listed = run(core_main, "scorers", "--plugins", str(plugins), "--json")["scorers"]
    listed = {row["name"]: row for row in listed}
    assert listed["found-1"]["kind"] == "plugin" and listed["found-2"]["kind"] == "plugin"
    prune = ["prune", "--model", str(search_model), "--cache-dir", str(search_cache), "--nsamples", "4", "--seqlen", "32",
             "--eval", "wikitext2-valid", "--max-windows", "2", "--json"]  # fmt: skip
    by_name = run(core_main, *prune, "--plugins", str(plugins), "--scorer", "found-1")
    by_text = run(core_main, *prune, "--formula", hall["entries"][0]["formula"])
    assert by_name["ppl"] == by_text["ppl"]


def test_validate_fills_the_test_table_like_the_sequential_driver(
    three_generations, search_model, search_cache, capsys
):
    argv = ["validate", str(three_generations), "--top", "1", "--patterns", "2:4", "--baselines", "wanda",
            "--nsamples", "4", "--seqlen", "32", "--max-windows", "2", "--cache-dir", str(search_cache),
            "--tasks", "rte", "--limit", "8", "--json"]  # fmt: skip
    assert run_cli(main, argv) == 0
    out = json.loads(capsys.readouterr().out)
    cells = {(c["metric"], c["pattern"]): c for c in out["cells"]}
    best = json.loads((three_generations / rundir.HALL_OF_FAME).read_text())["entries"][0]["formula"]
    assert set(cells) == {
        (f"#1 `{best}`", "2:4"),
        ("wanda", "2:4"),
    }

    # the same cell computed independently: a fresh model, the core's driver, perplexity, lm-eval
    model, tokenizer = load_model(str(search_model))
    assert out["dense_zeroshot"]["tasks"] == evaluate_zeroshot(model, tokenizer, "rte", limit=8)["tasks"]
    calibrate_and_prune(model, get_scorer("wanda"), SparsitySpec(0.5, 2, 4), tokenize_corpus(tokenizer, load_rows("c4")),
                        CALIBRATION, cache_root=Path(search_cache), progress=False)  # fmt: skip
    windows = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-test")), 32, 2)
    wanda = cells[("wanda", "2:4")]
    assert wanda["ppl"] == pytest.approx(perplexity(model, windows, progress=False)["ppl"], rel=1e-6)
    expected = evaluate_zeroshot(model, tokenizer, "rte", limit=8)
    assert wanda["zeroshot"]["tasks"] == expected["tasks"] and wanda["zeroshot"]["tasks"]["rte"]["n"] == 8
    table = (three_generations / rundir.VALIDATION).read_text()
    assert "| metric | 2:4 |" in table and "| wanda |" in table and f"`{best}`" in table
    accuracy_table = table[table.index("## Zero-shot mean accuracy") :]
    assert f"| wanda | {expected['mean_acc']:.4f} |" in accuracy_table


def test_validate_and_export_carry_a_weight_update(three_generations, search_model, search_cache, capsys):
    """`validate --update refit` and baselines like wanda+obs equal the core's driver with those updates;
    a run searched with an update exports plugins that apply it."""
    from dataclasses import replace

    from metric_search.export import plugin_data
    from pruning_core.plugins import UpdatingPluginScorer
    from pruning_core.updates import with_update

    argv = ["validate", str(three_generations), "--top", "1", "--patterns", "0.5", "--baselines", "wanda+obs",
            "--update", "refit", "--nsamples", "4", "--seqlen", "32", "--max-windows", "2",
            "--cache-dir", str(search_cache), "--json"]  # fmt: skip
    assert run_cli(main, argv) == 0
    cells = {c["metric"]: c for c in json.loads(capsys.readouterr().out)["cells"]}
    best = json.loads((three_generations / rundir.HALL_OF_FAME).read_text())["entries"][0]["formula"]
    windows = None
    for label, scorer in ((f"#1 `{best}` +refit", with_update(FormulaScorer(best), "refit")),
                          ("wanda+obs", with_update(get_scorer("wanda"), "obs"))):  # fmt: skip
        model, tokenizer = load_model(str(search_model))
        calibrate_and_prune(model, scorer, SparsitySpec(0.5), tokenize_corpus(tokenizer, load_rows("c4")), CALIBRATION, cache_root=Path(search_cache), progress=False)  # fmt: skip
        windows = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-test")), 32, 2)
        assert cells[label]["ppl"] == pytest.approx(
            perplexity(model, windows, progress=False)["ppl"], rel=1e-6
        )
        assert cells[label]["update"] == label.rpartition("+")[2]

    run = load_run(three_generations)
    run = replace(
        run, settings=replace(run.settings, evaluator=replace(run.settings.evaluator, update="obs"))
    )
    data = checked_plugin(plugin_data(run, run.state.hall_of_fame[0], 1, "found-obs"), "test")
    assert data["update"] == "obs" and data["stats"][-1] == "hessian"
    assert isinstance(UpdatingPluginScorer(data, "test"), UpdatingPluginScorer)
