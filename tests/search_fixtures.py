"""Helpers shared by the end-to-end search tests: tiny search settings, an in-process run, the part of a
run that must not depend on faults, and cleanup of Ray processes a SIGKILLed driver leaves behind.
The fixtures that use them (search_model, search_cache, local_ray) are in conftest.py."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import psutil
import ray

from fitness.setup import EvaluatorSettings
from metric_search import rundir
from metric_search.config import ExecutionSettings, SearchSettings
from metric_search.report import write_report
from metric_search.results import load_run
from metric_search.search import Search, start_run


def evaluator_settings(model_path, cache) -> EvaluatorSettings:
    return EvaluatorSettings(model=str(model_path), cache_dir=str(cache), nsamples=4, calib_seqlen=32,
                             fitness_windows=2, fitness_seqlen=32)  # fmt: skip


def search_settings(model_path, cache, generations: int, population: int = 10,
                    seed_formulas: tuple[str, ...] = ("abs(W) * X",)) -> SearchSettings:  # fmt: skip
    return SearchSettings(generations=generations, population=population, seed=7, confirm=2,
                          seed_formulas=seed_formulas, evaluator=evaluator_settings(model_path, cache))  # fmt: skip


def search_flags(settings: SearchSettings) -> list[str]:
    """The command line that gives ``settings`` (the CPU profile fills in everything else)."""
    e = settings.evaluator
    return ["--model", e.model, "--cache-dir", e.cache_dir, "--nsamples", str(e.nsamples),
            "--seqlen", str(e.calib_seqlen), "--fitness-windows", str(e.fitness_windows),
            "--fitness-seqlen", str(e.fitness_seqlen), "--population", str(settings.population),
            "--generations", str(settings.generations), "--seed", str(settings.seed),
            "--confirm", str(settings.confirm), "--seed-formulas", ",".join(settings.seed_formulas),
            "--settings", ",".join(e.patterns), "--top-windows", str(e.top_windows), "--update", e.update,
            "--top-rung", e.top_rung,
            "--promote", str(settings.promote), "--tune", str(settings.tune),
            "--final-top", str(settings.final_top), "--final-windows", str(settings.final_windows)]  # fmt: skip


def run_in_process(settings: SearchSettings, run_dir: Path, workers: int = 1, observer=None,
                   candidate_timeout: float = 300.0):  # fmt: skip
    """A new run on the Ray this process already holds; returns (search, final state)."""
    execution = ExecutionSettings(workers=workers, candidate_timeout=candidate_timeout, progress=False)
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


def candidate_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / rundir.CANDIDATES).read_text().splitlines()]


def actor_places(pool, busy_only: bool = False, with_starting: bool = False) -> list[dict]:
    """pid, node and resources of a pool's started actors (only those running a job when ``busy_only``):
    what a fault test needs to kill one, read from the pool's own records. ``with_starting`` waits for
    the actors still starting (a replacement) and includes them."""
    busy = [worker for worker, _, _ in pool._busy.values()]
    if busy_only:
        return [dict(worker.where) for worker in busy]
    starting = [ray.get(w.ready, timeout=120) for w in pool._starting.values()] if with_starting else []
    return [*(dict(worker.where) for worker in [*pool._idle, *busy]), *starting]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_leftovers(processes: list[psutil.Process]) -> None:
    """Ray helpers that outlive a SIGKILLed driver (its agents, raylet, GCS), ended by pid."""
    time.sleep(1)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=10)
