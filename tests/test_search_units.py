"""metric_search pieces that need no Ray: checkpoints as JSON, atomic files, multi-fidelity ranking,
the GP engine (determinism, limits, exact resume through JSON), Pareto fronts, what a resume may change.
Bad command-line input is tested in test_reliability_inputs.py."""

from __future__ import annotations

import json
import math
import os
import random
import zlib
from dataclasses import replace

import pytest

from fitness.memo import Memo
from fitness.setup import EvaluatorSettings
from metric_search import rundir
from metric_search.arguments import explicit_flags, resume_settings, search_parser, split_formulas
from metric_search.checkpoint import (
    SearchState,
    load_checkpoint,
    rng_from_json,
    rng_to_json,
    save_checkpoint,
    state_to_json,
)
from metric_search.config import ExecutionSettings, SearchSettings, settings_from_dict
from metric_search.engine import Engine
from metric_search.heldout import parse_patterns
from metric_search.report import pareto_front
from metric_search.search import start_run
from metric_search.selection import (
    TOP_ELIGIBLE_RANK,
    compare,
    drop_transient,
    rank_key,
    to_promote,
    tournament,
    update_hall_of_fame,
)
from primitives import canonical_key, parse_formula
from primitives.pset import tree_to_deap
from primitives.tree import depth, size
from pruning_core import files
from pruning_core.errors import UsageError


def settings(**overrides) -> SearchSettings:
    values = dict(generations=4, population=12, seed=5, max_depth=5, max_size=15)
    values.update(overrides)
    return SearchSettings(**values)


def fake_fitness(text: str) -> dict:
    """A deterministic stand-in score per formula, so the engine can be driven without a model."""
    value = (zlib.crc32(text.encode()) % 1000) / 100.0 + 1.0
    return {"fitness": value, "reason": None, "seconds": 0.0}


def score_population(population, candidates: dict) -> None:
    for ind in population:
        candidates.setdefault(ind.canonical, {"formula": ind.canonical, "size": 1,
                                              "proxy": fake_fitness("proxy " + ind.canonical),
                                              "ppl": fake_fitness(ind.canonical)})  # fmt: skip


# --- checkpoints -------------------------------------------------------------------------------


def test_rng_state_round_trips_through_json_and_continues_the_stream():
    rng = random.Random(11)
    [rng.random() for _ in range(100)]
    text = json.dumps(rng_to_json(rng.getstate()))
    restored = random.Random()
    restored.setstate(rng_from_json(json.loads(text)))
    assert [restored.random() for _ in range(50)] == [rng.random() for _ in range(50)]


@pytest.mark.parametrize(
    "bad",
    [[3, [0] * 10, None], [3, [2**32] * 625, None], [3, [0] * 624 + [700], None], "abc", [3, [0] * 625, "x"]],
)
def test_rng_state_rejects_anything_but_a_twister_state(bad):
    with pytest.raises(ValueError):
        rng_from_json(bad)


def sample_state() -> SearchState:
    candidates = {
        "X * abs(W)": {"formula": "X * abs(W)", "size": 4, "generation": 0,
                       "proxy": {"fitness": 0.25, "reason": None, "seconds": 0.1},
                       "ppl": {"fitness": 31.5, "reason": None, "seconds": 1.5},
                       "top": {"fitness": 30.0, "reason": None, "seconds": 6.0,
                               "values": {"0.5": 20.0, "2:4": 45.0}}},
        "W": {"formula": "W", "size": 1, "generation": 1, "proxy": {"fitness": math.inf, "reason": "constant",
                                                                    "seconds": 0.0}, "ppl": None, "top": None},
    }  # fmt: skip
    return SearchState(generation=1, rng=random.Random(3).getstate(), population=[("abs(W) * X", "X * abs(W)")],
                       candidates=candidates, hall_of_fame=["X * abs(W)"], history=[{"generation": 0}],
                       baselines={}, final={"rows": [{"formula": "X * abs(W)", "ratio": 1.0}]},
                       waiting=["W"])  # fmt: skip


def test_checkpoint_round_trip_keeps_every_value(tmp_path):
    state = sample_state()
    save_checkpoint(tmp_path, state)
    text = (tmp_path / rundir.CHECKPOINT).read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON: inf is null plus a reason
    loaded = load_checkpoint(tmp_path, parse_formula)
    assert loaded == state


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["population"].__setitem__(
            0, {"formula": "__import__('os').system('x')", "canonical": "W"}
        ),
        lambda d: d["candidates"]["W"].__setitem__("formula", "W.__class__"),
        lambda d: d.__setitem__("version", 99),
        lambda d: d["candidates"]["W"]["proxy"].__setitem__("reason", "fine"),
        lambda d: d.__setitem__("hall_of_fame", ["nope"]),
        lambda d: d.__setitem__("waiting", ["nope"]),
        lambda d: d["candidates"]["W"].__setitem__("tuning_parent", "nope"),
        lambda d: d["history"].append({"best_ppl": float("nan")}),
    ],
)
def test_checkpoint_rejects_tampered_content_with_one_line(tmp_path, tamper):
    data = state_to_json(sample_state())
    tamper(data)
    (tmp_path / rundir.CHECKPOINT).write_text(json.dumps(data))
    with pytest.raises(UsageError) as err:
        load_checkpoint(tmp_path, parse_formula)
    assert "\n" not in str(err.value)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, sample_state())
    path = tmp_path / rundir.CHECKPOINT
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UsageError, match="not a valid checkpoint"):
        load_checkpoint(tmp_path, parse_formula)


def test_atomic_write_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "file.json"
    files.atomic_write_text(path, "x" * 100_000)
    files.atomic_write_text(path, "short")
    assert path.read_text() == "short"

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        files.atomic_write_text(path, "new content")
    assert path.read_text() == "short"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]  # no temp file left behind


def test_torn_memo_line_is_cut_so_the_next_append_survives(tmp_path):
    path = tmp_path / "candidates.jsonl"
    memo = Memo(path)
    memo.put("W", "proxy", {"fitness": 1.0, "reason": None})
    with open(path, "a") as fh:
        fh.write('{"canonical": "X", "fid')  # a kill in the middle of an append
    files.drop_torn_tail(path)
    Memo(path).put("G", "ppl", {"fitness": 2.0, "reason": None})
    again = Memo(path)
    assert again.get("W", "proxy")["fitness"] == 1.0 and again.get("G", "ppl")["fitness"] == 2.0
    assert len(path.read_text().splitlines()) == 2


def test_config_round_trips_and_rejects_unknown_fields():
    s = settings(seed_formulas=("abs(W)",), evaluator=EvaluatorSettings(model="m", patterns=("2:4", "0.6")))
    data = json.loads(json.dumps(s.as_dict()))
    assert settings_from_dict(data, "config.json") == s
    with pytest.raises(UsageError):
        settings_from_dict({**data, "exec": "rm -rf"}, "config.json")
    with pytest.raises(UsageError):
        settings_from_dict({**data, "population": "12"}, "config.json")


def test_a_config_from_before_the_calib_seed_rename_keeps_its_calibration_seed():
    s = settings(evaluator=EvaluatorSettings(model="m", calib_seed=3))
    data = json.loads(json.dumps(s.as_dict()))
    data["evaluator"]["seed"] = data["evaluator"].pop("calib_seed")  # how earlier runs wrote it
    assert settings_from_dict(data, "config.json") == s


def test_a_config_from_before_the_window_order_setting_resumes_on_the_first_windows():
    s = settings(evaluator=EvaluatorSettings(model="m", window_order="first"))
    data = json.loads(json.dumps(s.as_dict()))
    del data["evaluator"]["window_order"]  # earlier runs read the first windows and did not say so
    assert settings_from_dict(data, "config.json") == s
    assert EvaluatorSettings().window_order == "spread"  # while new runs spread them


def test_the_report_names_the_held_out_windows_of_new_and_earlier_final_checks():
    from metric_search.report import _held_out_text

    assert _held_out_text({"window_indices": [14, 45, 74], "windows": 3}) == "windows 14, 45, 74"
    assert (
        _held_out_text({"first_window": 8, "windows": 16}) == "windows 8-23"
    )  # written before spread windows


# --- ranking -----------------------------------------------------------------------------------


def entry(proxy=None, ppl=None, size=3, top=None):
    make = lambda v: None if v is None else {"fitness": v, "reason": None if v != math.inf else "error"}  # noqa: E731
    return {"proxy": make(proxy), "ppl": make(ppl), "top": make(top), "size": size}


def test_formulas_compare_at_the_highest_rung_both_reached():
    a, b = entry(0.9, 50.0, top=48.0), entry(0.1, 40.0)
    assert compare(("a", a), ("b", b)) == 1  # both reached ppl: b's 40 beats a's 50 (a's top is not b's)
    c = entry(0.2)
    assert compare(("a", a), ("c", c)) == 1 and compare(("c", c), ("a", a)) == -1  # only the proxy is shared
    assert compare(("d", entry(math.inf)), ("c", c)) == 1  # invalid loses to anything measured
    assert compare(("x", entry(0.3, size=2)), ("y", entry(0.3, size=5))) == -1  # tie: the smaller formula
    assert compare(("x", entry(0.3)), ("x", entry(0.3))) == 0


def test_hall_order_puts_the_highest_rung_first():
    candidates = {
        "a": entry(0.9, 50.0, top=60.0),
        "b": entry(0.1),
        "c": entry(0.2, 40.0),
        "d": entry(math.inf),
        "e": entry(),
        "f": entry(0.5, 55.0, top=45.0),
    }
    order = sorted(candidates, key=lambda k: rank_key(k, candidates[k]))
    assert order == ["f", "a", "c", "b", "d", "e"]


def test_the_ladder_promotes_the_best_of_the_rung_below():
    rng = random.Random(0)
    candidates = {f"f{i}": entry(rng.random(), 10.0 if i % 4 == 0 else None) for i in range(40)}
    candidates["bad"] = entry(math.inf)
    keys = list(candidates) * 2  # duplicates in the population count once
    expected = sorted(
        (e["proxy"]["fitness"], k) for k, e in candidates.items() if e["ppl"] is None and k != "bad"
    )
    assert to_promote(keys, candidates, "ppl", 5) == [k for _, k in expected[:5]]


@pytest.mark.parametrize("measured, eligible_rank", [(8, TOP_ELIGIBLE_RANK), (40, 10), (41, 11)])
def test_the_top_rung_takes_only_contenders_by_base_perplexity(measured, eligible_rank):
    """Eligible: base perplexity among the best quarter of all measured, and never fewer than the best 5."""
    base = random.Random(measured).sample(range(10, 1000), measured)
    candidates = {f"k{i}": entry(0.1, float(ppl)) for i, ppl in enumerate(base)}
    best = min(candidates, key=lambda k: candidates[k]["ppl"]["fitness"])
    candidates[best]["top"] = {"fitness": 6.0, "reason": None}  # the best already climbed
    bar = sorted(base)[eligible_rank - 1]  # rank counts every measured formula, climbed or not
    expected = sorted((candidates[k]["ppl"]["fitness"], k) for k in candidates if k != best)
    expected = [k for ppl, k in expected if ppl <= bar]
    assert len(expected) == eligible_rank - 1
    assert to_promote(list(candidates), candidates, "top", 100) == expected
    assert to_promote(list(candidates), candidates, "top", 2) == expected[:2]


def test_hall_of_fame_is_unique_measured_and_ranked_by_rung():
    candidates = {
        "a": entry(0.1, 30.0),
        "b": entry(0.2, 20.0),
        "c": entry(0.05),
        "d": entry(0.3, 25.0, top=26.0),
    }
    hall = update_hall_of_fame(["a"], ["b", "b", "c", "d"], candidates, 3)
    assert hall == ["d", "b", "a"]


def test_machine_failures_are_forgotten_and_formula_failures_kept():
    timed_out = {"proxy": {"fitness": 0.1, "reason": None}, "ppl": {"fitness": math.inf, "reason": "timeout"}}
    broken = {"proxy": {"fitness": math.inf, "reason": "nonfinite"}, "ppl": None}
    lost = {"proxy": {"fitness": math.inf, "reason": "lost"}, "ppl": None}
    candidates = {"t": timed_out, "b": broken, "l": lost}
    assert drop_transient(candidates) == 2
    assert candidates["t"]["ppl"] is None and candidates["t"]["proxy"]["fitness"] == 0.1
    assert candidates["l"]["proxy"] is None
    assert candidates["b"]["proxy"]["reason"] == "nonfinite"


def test_tournament_picks_the_best_with_the_textbook_probability():
    n, k, rounds = 10, 3, 20_000
    candidates = {f"k{i}": entry(ppl=float(i)) for i in range(n)}
    keys = list(candidates)
    winners = tournament(random.Random(1), keys, candidates, rounds, k)
    best_share = winners.count(0) / rounds
    assert best_share == pytest.approx(1 - (1 - 1 / n) ** k, abs=0.015)
    assert winners.count(n - 1) / rounds == pytest.approx((1 / n) ** k, abs=0.005)


def test_pareto_front_matches_brute_force():
    rng = random.Random(2)
    points = [(rng.randint(1, 12), rng.random()) for _ in range(80)]
    front = set(pareto_front(points))
    dominated = {p for p in points if any(q[0] <= p[0] and q[1] < p[1] for q in points)}
    expected = {(s, v) for s, v in points if (s, v) not in dominated}
    expected = {p for p in expected if not any(q[0] < p[0] and q[1] == p[1] for q in points)}
    assert front == expected


def test_validation_patterns_are_parsed_labelled_and_deduplicated():
    assert parse_patterns("run, 0.5, 2:4,4:8,2:4, 0.6", ("0.5",)) == [
        ("50%", (0.5, 0, 0)), ("2:4", (0.5, 2, 4)), ("4:8", (0.5, 4, 8)), ("60%", (0.6, 0, 0))
    ]  # fmt: skip
    assert parse_patterns("run", ("2:4",)) == [("2:4", (0.5, 2, 4))]
    assert parse_patterns("run,0.6", ("0.5", "2:4")) == [
        ("50%", (0.5, 0, 0)), ("2:4", (0.5, 2, 4)), ("60%", (0.6, 0, 0))
    ]  # fmt: skip
    for bad in ("3:2", "1.5", "half", ","):
        with pytest.raises(UsageError):
            parse_patterns(bad, ("0.5",))


# --- engine ------------------------------------------------------------------------------------


def evolve(engine: Engine, generations: int, candidates: dict, population=None):
    population = population or engine.initial_population()
    score_population(population, candidates)
    history = [[ind.formula for ind in population]]
    for _ in range(generations):
        elites, offspring = engine.next_generation(population, candidates)
        population = elites + offspring
        score_population(population, candidates)
        history.append([ind.formula for ind in population])
    return population, history


def test_engine_is_deterministic_and_leaves_global_random_alone():
    random.seed(123)
    outside = random.getstate()
    _, first = evolve(Engine(settings()), 5, {})
    assert random.getstate() == outside
    _, second = evolve(Engine(settings()), 5, {})
    _, other_seed = evolve(Engine(settings(seed=6)), 5, {})
    assert first == second
    assert first != other_seed


def test_offspring_respect_depth_and_size_limits_and_canonical_keys():
    s = settings(max_depth=4, max_size=9, population=30, mut_prob=0.9, cx_prob=0.9)
    engine = Engine(s)
    population, _ = evolve(engine, 8, {})
    for ind in population:
        tree = parse_formula(ind.formula)
        assert depth(tree) <= 4 and size(tree) <= 9
        assert ind.canonical == canonical_key(ind.formula, "row")
        assert list(tree_to_deap(ind.formula, engine.pset)) == list(ind.tree)  # text is a faithful copy


def test_seed_formulas_open_the_population():
    s = settings(seed_formulas=("abs(W) * X", "sqr(W) * mms(G)"))
    population = Engine(s).initial_population()
    assert [ind.canonical for ind in population[:2]] == [
        canonical_key("abs(W) * X"),
        canonical_key("sqr(W) * mms(G)"),
    ]
    assert len(population) == s.population


def test_elites_survive_unchanged():
    engine = Engine(settings(elite=3))
    candidates: dict = {}
    population = engine.initial_population()
    score_population(population, candidates)
    best = sorted({ind.canonical for ind in population}, key=lambda k: (candidates[k]["ppl"]["fitness"], k))[
        :3
    ]
    elites, offspring = engine.next_generation(population, candidates)
    assert [e.canonical for e in elites] == best
    assert len(elites) + len(offspring) == len(population)


def test_children_that_repeat_the_population_are_mutated_again():
    engine = Engine(settings(population=20, mut_prob=0.3))
    population = [engine.from_text("abs(W) * X") for _ in range(20)]
    candidates: dict = {}
    score_population(population, candidates)
    elites, offspring = engine.next_generation(population, candidates)
    repeats = sum(child.canonical == population[0].canonical for child in offspring)
    # without the retries, crossover of identical parents and 70% unmutated children repeat it ~70% of the time
    assert repeats <= len(offspring) // 4
    assert [e.canonical for e in elites] == [population[0].canonical]


def test_most_offspring_slots_bring_a_formula_never_measured_before():
    """Novelty against every measured formula: over 10 generations of 20, more than half of the 200
    offspring are new (with novelty against the population only, about a third were)."""
    for seed in (9, 10):
        engine, candidates = Engine(settings(population=20, seed=seed, max_depth=6, max_size=24)), {}
        evolve(engine, 10, candidates)
        assert len(candidates) - 20 > 100, (seed, len(candidates))


def test_resume_through_a_json_checkpoint_is_exact(tmp_path):
    """Evolve 6 generations in one go, and 3 + (JSON checkpoint, new engine) + 3: same populations."""
    s = settings()
    _, straight = evolve(Engine(s), 6, {})

    engine, candidates = Engine(s), {}
    population, first = evolve(engine, 3, candidates)
    state = SearchState(generation=3, rng=engine.rng.getstate(),
                        population=[(i.formula, i.canonical) for i in population], candidates=candidates)  # fmt: skip
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path, parse_formula)
    resumed = Engine(s)
    resumed.rng.setstate(loaded.rng)
    population = [resumed.from_text(formula) for formula, _ in loaded.population]
    _, second = evolve(resumed, 3, loaded.candidates, population)
    assert first + second[1:] == straight


# --- command line ------------------------------------------------------------------------------


def test_split_formulas_respects_parentheses():
    assert split_formulas("wanda, add(W, X) ,sqr(W) * mms(G)") == ["wanda", "add(W, X)", "sqr(W) * mms(G)"]
    with pytest.raises(UsageError):
        split_formulas("wanda,,magnitude")


def test_resume_keeps_the_run_settings_and_takes_only_how_to_run(tmp_path):
    run_dir = tmp_path / "run"
    saved = settings(evaluator=EvaluatorSettings(model="m", cache_dir="/data/cache", timeout_s=120.0))
    start_run(saved, run_dir, "run", ExecutionSettings())
    parser = search_parser()

    def resume(*flags):
        argv = ["--resume", str(run_dir), *flags]
        return resume_settings(parser.parse_args(argv), explicit_flags(parser, argv))[1]

    assert resume() == saved  # profile defaults never leak into a resumed run
    assert resume("--workers", "1", "--profile", "gpu") == saved
    extended = resume("--generations", "9", "--cache-dir", "/other", "--candidate-timeout", "60")
    assert (extended.generations, extended.evaluator.cache_dir, extended.evaluator.timeout_s) == (
        9,
        "/other",
        60.0,
    )
    assert replace(extended, generations=4, evaluator=saved.evaluator) == saved
    with pytest.raises(UsageError, match="--window-order first differs from the run's spread"):
        resume("--window-order", "first")  # other windows, other numbers
    for flag, value, theirs in (
        ("--fitness-batch", "4", "1"),
        ("--seqlen", "128", "256"),
        ("--tune", "3", "1"),
    ):
        with pytest.raises(UsageError, match=f"^{flag} {value} differs from the run's {theirs};"):
            resume(flag, value)  # every flag that sets a field of the run is checked, by the field it sets


def test_every_default_in_search_help_is_the_one_the_search_uses():
    """Help text and resolved settings come from one source; a literal that drifts fails here."""
    import re

    from metric_search.arguments import execution_from_args, search_parser, settings_from_args
    from metric_search.config import PROFILES

    parser = search_parser()
    helps = {option: action.help for action in parser._actions for option in action.option_strings}
    for profile in PROFILES:
        args = parser.parse_args(["--profile", profile])
        s, x = settings_from_args(args), execution_from_args(args, "cpu")
        e = s.evaluator
        resolved = {
            "--generations": s.generations, "--population": s.population, "--seed": s.seed,
            "--cx-prob": s.cx_prob, "--mut-prob": s.mut_prob, "--tournament": s.tournament, "--elite": s.elite,
            "--hof-size": s.hof_size, "--init-depth": f"{s.init_min_depth}:{s.init_max_depth}",
            "--max-depth": s.max_depth, "--max-size": s.max_size, "--group": e.group, "--update": e.update,
            "--calib": e.calib, "--nsamples": e.nsamples, "--seqlen": e.calib_seqlen, "--calib-seed": e.calib_seed,
            "--fitness-data": e.fitness_data, "--fitness-windows": e.fitness_windows,
            "--top-windows": e.top_windows, "--fitness-seqlen": e.fitness_seqlen, "--confirm": s.confirm,
            "--promote": s.promote, "--tune": s.tune, "--final-top": s.final_top,
            "--final-windows": s.final_windows, "--threads": x.threads, "--candidate-timeout": x.candidate_timeout,
            "--actors-per-gpu": x.actors_per_gpu, "--top-rung": e.top_rung, "--fitness-batch": e.batch_size,
            "--window-order": e.window_order, "--settings": ",".join(e.patterns),
        }  # fmt: skip
        for flag, value in resolved.items():
            text = helps[flag]
            found = re.search(rf"\b{profile} ([^;)]+)", text) or re.findall(
                r"\((?:default )?([^()]+)\)", text
            )
            shown = found.group(1) if isinstance(found, re.Match) else found[-1]
            if isinstance(value, (int, float)):
                assert float(shown) == float(value), (profile, flag, text)
            else:
                assert shown == value, (profile, flag, text)
