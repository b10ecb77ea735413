"""Fault injection on a tiny random LLaMA with an embedded Ray: bad candidates (NaN, inf, constant scores,
a shape error, an exception, a hang), killed actors, a SIGKILLed driver at chosen points, and a damaged
statistics cache. Every search that survives a fault must end exactly like the fault-free run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from ray import cloudpickle
from search_fixtures import (
    actor_places,
    candidate_rows,
    descendants,
    evaluator_settings,
    outcome,
    run_in_process,
    search_flags,
    search_settings,
    stop_leftovers,
)

from fitness import stats_cache
from fitness.stats_cache import StatsCache
from metric_search import dispatch, rundir
from metric_search.checkpoint import load_checkpoint
from metric_search.cli import main
from primitives import canonical_key, parse_formula
from pruning_core.cli_common import run_cli
from pruning_core.models import load_model
from pruning_core.pruning import Calibration

pytestmark = pytest.mark.reliability

GENERATIONS = 3
POPULATION = 8
PAUSED_DRIVER = Path(__file__).with_name("paused_driver.py")


def settings(model, cache, seed_formulas=("abs(W) * X",)):
    return search_settings(model, cache, GENERATIONS, POPULATION, seed_formulas)


@pytest.fixture(scope="module")
def reference_run(local_ray, search_model, search_cache, tmp_path_factory) -> tuple[Path, list[tuple]]:
    """The fault-free run every faulty run is compared with (same settings, same seed), and what was on
    disk at each of its results: (rows, whether the last row is this result's rung, whether rows repeat)."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    on_disk = []

    def look_at_the_memo(event, **info):
        if event == "result":
            rows = [(r["canonical"], r["fidelity"]) for r in candidate_rows(run_dir)]
            on_disk.append((len(rows), rows[-1][1] == info["fidelity"], len(set(rows)) < len(rows)))

    run_in_process(settings(search_model, search_cache), run_dir, workers=2, observer=look_at_the_memo)
    return run_dir, on_disk


@pytest.fixture(scope="module")
def reference(reference_run) -> Path:
    return reference_run[0]


# --- bad candidates ------------------------------------------------------------------------------

# Seed formulas whose evaluation the actors replace by a fault; "W - W" needs no injection: the formula
# language itself gives constant scores for it.
INJECTED = {"abs(W) * G": "nan", "abs(W) + X": "inf", "abs(W) * H": "shape", "tanh(W) * X": "exception",
            "sqrt(G) * abs(W)": "hang"}  # fmt: skip
EXPECTED = {"nan": ("nonfinite", ""), "inf": ("nonfinite", ""), "constant": ("constant", ""),
            "shape": ("error", "scores shape"), "exception": ("error", "RuntimeError: injected fault"),
            "hang": ("timeout", "no result within")}  # fmt: skip


class FaultyScorer:
    """Scores that break the way a buggy metric can."""

    stats = ()
    default_group = "row"

    def __init__(self, fault: str):
        self.name = self.fault = fault

    def score(self, weight, stats):
        if self.fault == "nan":
            return torch.full_like(weight, math.nan)
        if self.fault == "inf":
            return weight.abs() * math.inf
        if self.fault == "shape":
            return weight[:, :3]
        if self.fault == "exception":
            raise RuntimeError("injected fault")
        time.sleep(3600)  # hang: only the dispatcher's deadline ends this
        return weight


class FaultyActor(dispatch.PoolActor):
    """The search's own actor, except that the formulas in FAULTS are scored by a FaultyScorer."""

    FAULTS = {canonical_key(text, "row"): fault for text, fault in INJECTED.items()}

    def evaluate(self, formula: str, fidelity: str = "ppl") -> dict:
        fault = self.FAULTS.get(formula)
        if fault is None:
            return super().evaluate(formula, fidelity)
        return self.evaluator.evaluate(FaultyScorer(fault), fidelity)


def test_bad_candidates_end_with_inf_and_their_reason(local_ray, search_model, search_cache, tmp_path,
                                                       monkeypatch):  # fmt: skip
    # Ray imports actor classes by module name in its workers; this test module is not importable there.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(dispatch, "PoolActor", FaultyActor)
    seeds = ("W - W", *INJECTED, "abs(W) * X")
    faults = {canonical_key("W - W", "row"): "constant", **FaultyActor.FAULTS}
    assert len(faults) == 6
    run_dir = tmp_path / "bad-candidates"
    # One generation screens every seed; no final check (it runs in the driver, not on the actors).
    # candidate_timeout 1 s: the dispatcher gives up on the hung candidate after 1 + 10 s.
    one_generation = replace(settings(search_model, search_cache, seeds), generations=1, final_top=0)
    search, state = run_in_process(one_generation, run_dir, workers=2, candidate_timeout=1.0)

    assert state.generation == 0 and state.hall_of_fame
    assert search.actors_replaced == 1  # the hung actor, and no other
    rows = {}
    for row in candidate_rows(run_dir):
        rows.setdefault(row["canonical"], []).append(row)
    for key, fault in faults.items():
        reason, detail = EXPECTED[fault]
        (row,) = rows[key]  # screened once, never confirmed
        assert (row["fitness"], row["fidelity"], row["reason"]) == ("inf", "proxy", reason), (fault, row)
        assert detail in row["detail"], (fault, row)
        proxy = state.candidates[key]["proxy"]  # the checkpoint agrees with the memo
        assert (proxy["fitness"], proxy["reason"]) == (math.inf, reason)
        assert key not in state.hall_of_fame
    invalid = json.loads((run_dir / rundir.GENERATIONS).read_text().splitlines()[0])["invalid"]
    for reason in ("nonfinite", "constant", "error", "timeout"):
        assert invalid[reason] >= sum(EXPECTED[f][0] == reason for f in faults.values())


# --- killed actors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "workers, victims",
    [(2, {"gen 1": "one", "gen 2": "all"}), (1, {"gen 1": "all"})],
    ids=["one-then-both", "the-only-one"],
)
def test_killed_actors_change_nothing(reference, search_model, search_cache, tmp_path, workers, victims):
    """At a generation's first result, one actor (a busy one) or all of them are SIGKILLed."""
    killed = {}

    def kill_actors(event, **info):
        if event == "result" and info["label"] in victims and info["label"] not in killed:
            pool = info["pool"]
            targets = actor_places(pool, with_starting=True)
            if victims[info["label"]] == "one":
                targets = (actor_places(pool, busy_only=True) or targets)[:1]
            killed[info["label"]] = [target["pid"] for target in targets]
            for target in targets:
                os.kill(target["pid"], signal.SIGKILL)

    run_dir = tmp_path / "actors-killed"
    search, _ = run_in_process(settings(search_model, search_cache), run_dir, workers=workers,
                               observer=kill_actors)  # fmt: skip
    expected = {label: 1 if victim == "one" else workers for label, victim in victims.items()}
    assert {label: len(set(pids)) for label, pids in killed.items()} == expected
    pids = [pid for group in killed.values() for pid in group]
    assert len(set(pids)) == len(pids)  # the second kill found live actors (one a replacement)
    assert search.actors_replaced >= len(pids)
    assert outcome(run_dir) == outcome(reference)


def test_a_job_that_reaches_actors_already_dead_runs_on_a_fresh_one(local_ray, search_model, search_cache):
    """Both idle actors are killed at once; the next job reaches one, then the other (dead, not yet
    noticed), before a replacement: neither death is the job's fault, so it must not end as lost."""
    pool = dispatch.EvaluatorPool(evaluator_settings(search_model, search_cache).as_dict(), workers=2,
                                  threads=1, gpu_share=0.0, hard_timeout=300.0)  # fmt: skip
    try:
        jobs = [dispatch.Job("abs(W) * X", "proxy"), dispatch.Job("abs(W)", "proxy")]
        before = pool.run(jobs)
        victims = [psutil.Process(w["pid"]) for w in actor_places(pool)]
        assert len(victims) == 2
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=30)
        (after,) = pool.run(jobs[:1])
    finally:
        pool.shutdown()
    assert pool.replaced >= 2  # both dead actors got the job, and were replaced
    assert (after["reason"], after["fitness"]) == (None, before[0]["fitness"])


def test_an_actor_that_cannot_be_placed_is_given_up_and_the_others_take_its_jobs(
    local_ray, search_model, search_cache
):
    """Two 1-CPU actors fill the 2-CPU Ray. One is killed and a placement group takes its CPU, so its
    replacement can never be placed: the survivor runs every job. When the survivor dies the same way,
    no actor is left and the pool says so instead of waiting forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    def kill_and_hold_its_cpu(actor: dict):
        process = psutil.Process(actor["pid"])
        process.send_signal(signal.SIGKILL)
        psutil.wait_procs([process], timeout=30)
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready(), timeout=60)  # Ray has noticed the death and lent its CPU to the group
        return group

    pool = dispatch.EvaluatorPool(evaluator_settings(search_model, search_cache).as_dict(), workers=2,
                                  threads=1, gpu_share=0.0, hard_timeout=300.0)  # fmt: skip
    groups = []
    try:
        jobs = [dispatch.Job(f, "proxy") for f in ("abs(W) * X", "abs(W)", "sqrt(X) * abs(W)")]
        before = pool.run(jobs)
        pool.placement_timeout = 5.0  # once the first actors are up (their start takes longer here)
        victim, survivor = actor_places(pool)
        groups.append(kill_and_hold_its_cpu(victim))
        after = pool.run(jobs)
        assert [r["fitness"] for r in after] == [r["fitness"] for r in before]
        assert all(r["reason"] is None for r in after)
        assert [w["pid"] for w in actor_places(pool)] == [survivor["pid"]]  # the replacement never came up
        time.sleep(5.0)
        assert pool.run(jobs[:1])[0]["fitness"] == before[0]["fitness"]
        assert pool.unplaced == 1  # given up (after 5 s), so it takes no CPU that frees up later

        groups.append(kill_and_hold_its_cpu(survivor))
        with pytest.raises(dispatch.PoolError, match="2 could not be placed within 5 s"):
            pool.run(jobs[:1])  # both replacements given up, none left
        assert pool.unplaced == 2
    finally:
        pool.shutdown()
        for group in groups:
            remove_placement_group(group)


def test_every_result_is_on_disk_before_the_next_one_arrives(reference_run):
    """What makes "a killed driver loses at most the jobs in flight" true."""
    _, on_disk = reference_run
    assert [rows for rows, _, _ in on_disk] == list(range(1, len(on_disk) + 1)) and len(on_disk) > POPULATION
    assert all(last_is_this_rung and not repeated for _, last_is_this_rung, repeated in on_disk)


# --- a killed driver -----------------------------------------------------------------------------


def rows_before(run_dir: Path, label: str) -> int:
    labels = [row["label"] for row in candidate_rows(run_dir)]
    return labels.index(label)


def kill_when_paused(command: list[str], env: dict, run_dir: Path, paused, budget_s: float = 240.0) -> None:
    """Run the driver until ``paused(run_dir)`` holds, SIGKILL it, and end the Ray processes it left."""
    log = run_dir.with_name("driver.log")
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **env})
    helpers, deadline, hit = [], time.monotonic() + budget_s, False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            helpers = descendants(proc.pid) or helpers
            if paused(run_dir):
                hit = True
                break
            time.sleep(0.05)
        helpers = descendants(proc.pid) or helpers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        stop_leftovers(helpers)
    assert hit, f"the driver never reached the pause: {log.read_text()[-2000:]}"


def checkpoint_generation(run_dir: Path) -> int | None:
    """The generation of the checkpoint on disk (None before the first one)."""
    try:
        return json.loads((run_dir / rundir.CHECKPOINT).read_text())["generation"]
    except OSError:
        return None


def rows_on_disk(run_dir: Path) -> int:
    path = run_dir / rundir.CANDIDATES
    return path.read_text().count("\n") if path.is_file() else 0


def checkpoint_temps(run_dir: Path) -> list[Path]:
    return list(run_dir.glob(f".{rundir.CHECKPOINT}.*.tmp")) if run_dir.is_dir() else []


def temp_generations(run_dir: Path) -> set[int]:
    """The generations of the checkpoint temp files written whole (one being written may not parse yet)."""
    found = set()
    for temp in checkpoint_temps(run_dir):
        with contextlib.suppress(OSError, ValueError):
            found.add(json.loads(temp.read_text())["generation"])
    return found


POINTS = {"baselines": -1, "mid-generation": 0, "checkpoint-write": 0}  # the checkpoint's generation then


def pause_plan(point: str, run_dir: Path, reference: Path):
    """(environment for paused_driver.py, a test that the driver is there) for a driver started on
    ``run_dir`` as it is now: the result counts are the new driver's, the rows on disk were there before."""
    if point == "checkpoint-write":

        def there(run_dir: Path) -> bool:
            return checkpoint_generation(run_dir) == 0 and 1 in temp_generations(run_dir)

        return {"PAUSE_IN_CHECKPOINT_WRITE": "1"}, there
    # After the 2nd result (the baselines come first), or after the 1st result of generation 1.
    k = 2 if point == "baselines" else rows_before(reference, "gen 1") + 1

    def there(run_dir: Path) -> bool:
        return rows_on_disk(run_dir) >= k

    return {"PAUSE_AFTER_RESULT": str(k - rows_on_disk(run_dir))}, there


def test_a_driver_sigkilled_at_each_point_resumes_to_the_same_run(reference, search_model, search_cache, tmp_path,
                                                                  capsys):  # fmt: skip
    """One run, SIGKILLed at each point in turn (every restart is `--resume` of the run the last kill left)
    and then resumed to its end: it ends exactly like the reference run, and nothing computed is lost."""
    run_dir = tmp_path / "killed"
    flags = [*search_flags(settings(search_model, search_cache)), "--run-dir", str(run_dir)]
    persisted = []
    for point, generation in POINTS.items():
        env, there = pause_plan(point, run_dir, reference)
        start = ["--resume", str(run_dir)] if persisted else flags
        # --no-preflight: the cache holds the statistics already; a driver's own evaluator adds nothing here
        command = [sys.executable, str(PAUSED_DRIVER), *start, "--workers", "1", "--no-preflight", "--quiet"]
        kill_when_paused(command, env, run_dir, there)

        # The checkpoint on disk is a whole one: the last one completed before the kill.
        assert load_checkpoint(run_dir, parse_formula).generation == generation, point
        on_disk = [(r["canonical"], r["fidelity"]) for r in candidate_rows(run_dir)]
        assert on_disk[: len(persisted)] == persisted, point  # what the last driver saved is kept
        if point == "checkpoint-write":
            (temp,) = checkpoint_temps(run_dir)  # the interrupted write is left behind, whole but unused
            assert json.loads(temp.read_text())["generation"] == 1
        else:  # every result up to the kill is on disk
            assert len(on_disk) == len(persisted) + int(env["PAUSE_AFTER_RESULT"]), point
        persisted = on_disk

    # The last resume runs in this process, on the module's Ray (a Ray start costs several seconds).
    assert (
        run_cli(main, ["--resume", str(run_dir), "--workers", "2", "--no-preflight", "--quiet", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["generations"] == GENERATIONS
    assert outcome(run_dir) == outcome(reference)
    assert not checkpoint_temps(run_dir)
    final = [(r["canonical"], r["fidelity"]) for r in candidate_rows(run_dir)]
    assert final[: len(persisted)] == persisted  # results from before the kills were kept, not recomputed
    assert sorted(final) == sorted((r["canonical"], r["fidelity"]) for r in candidate_rows(reference))


# --- statistics cache ----------------------------------------------------------------------------


def flip_last_float(raw: bytes) -> bytes:
    """Change the last float32 of the tensor data: the file still parses, one value is wrong."""
    return raw[:-4] + bytes(b ^ 0x5A for b in raw[-4:])


DAMAGES = {
    "flipped-value": ("safetensors", flip_last_float),
    "truncated": ("safetensors", lambda raw: raw[: len(raw) // 3]),
    "emptied": ("safetensors", lambda raw: b""),
    "sidecar-garbage": ("json", lambda raw: b"{not json"),
    "sidecar-wrong-checksum": ("json", lambda raw: raw.replace(b'"sha256": "', b'"sha256": "0')),
}


def test_on_the_cpu_per_weight_statistics_stay_in_the_cache_file(search_model, tmp_path):
    """G and the Hessians are read from the cache file on each use (held, they would double an
    evaluator's memory); X and H are held. Every value equals the file's, just computed or loaded, and
    an open cache outlives the file's removal."""
    from safetensors.torch import load_file

    model, tokenizer = load_model(str(search_model))
    key = Calibration(nsamples=4, seqlen=32)
    for _ in ("computed", "loaded"):
        cache = StatsCache.load_or_compute(model, tokenizer, key, tmp_path, progress=False)
        (data_file,) = (tmp_path / "stats").glob("*.safetensors")
        on_disk = load_file(data_file)
        assert set(cache.tensors) == set(on_disk)
        for name, tensor in on_disk.items():
            assert torch.equal(cache.tensors[name], tensor), name
            held = cache.tensors[name] is cache.tensors[name]
            assert held == name.endswith(("/X", "/H")), name
    data_file.unlink()
    for linear, owner in cache.hessian_of.items():
        assert torch.equal(cache.stat(linear, "G"), on_disk[f"{linear}/G"])
        assert torch.equal(cache.linear_stats(linear)["hessian"], on_disk[f"{owner}/hessian"])


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_statistics_cache_is_detected_recomputed_and_not_used(search_model, tmp_path, monkeypatch,
                                                                      damage):  # fmt: skip
    from safetensors.torch import load_file

    model, tokenizer = load_model(str(search_model))
    key = Calibration(nsamples=4, seqlen=32)
    first = dict(StatsCache.load_or_compute(model, tokenizer, key, tmp_path, progress=False).tensors)
    (data_file,) = (tmp_path / "stats").glob("*.safetensors")
    suffix, damage_bytes = DAMAGES[damage]
    target = data_file.with_suffix("." + suffix)
    pristine = target.read_bytes()
    target.write_bytes(damage_bytes(pristine))
    if damage == "flipped-value":  # the damage is invisible without the checksum
        loaded = load_file(data_file)
        assert any(not torch.equal(loaded[name], first[name]) for name in loaded)

    computed = []
    original = stats_cache.compute_stats
    monkeypatch.setattr(stats_cache, "compute_stats", lambda *a, **k: computed.append(1) or original(*a, **k))
    second = StatsCache.load_or_compute(model, tokenizer, key, tmp_path, progress=False)
    assert computed == [1]
    assert second.tensors.keys() == first.keys()
    for name, tensor in first.items():
        assert torch.equal(second.tensors[name], tensor), name
    assert target.read_bytes() == pristine  # rewritten whole, with its checksum
    StatsCache.load_or_compute(model, tokenizer, key, tmp_path, progress=False)
    assert computed == [1]  # and trusted again from then on
