"""Candidates per second of the metric search's evaluator pool with 1 and then 2 workers (one torch
thread each) on the same generation: the unique canonical forms of one seeded initial population,
evaluated at one fidelity. Actor start-up is excluded (each pool first warms up on one job per worker);
the statistics cache is filled before timing. Target: 2 workers / 1 worker >= 1.8.
"""

from __future__ import annotations

import math
import time

from common import evaluator_parser, evaluator_settings, report

from fitness.setup import EvaluatorSettings, build_evaluator
from metric_search import cluster
from metric_search.config import SearchSettings
from metric_search.dispatch import EvaluatorPool, Job
from metric_search.engine import Engine


def one_generation(settings: SearchSettings) -> list[str]:
    """Distinct canonical forms of the seeded initial population, in population order."""
    return list(dict.fromkeys(ind.canonical for ind in Engine(settings).initial_population()))


def timed_pool(evaluator: EvaluatorSettings, workers: int, jobs: list[Job]) -> tuple[float, list[dict]]:
    pool = EvaluatorPool(evaluator.as_dict(), workers, 1, 0.0, hard_timeout=3600.0)
    try:
        pool.run([Job("abs(W) * X", jobs[0].fidelity)] * workers)  # every actor up, imports and caches warm
        started = time.perf_counter()
        results = pool.run(jobs)
        return time.perf_counter() - started, results
    finally:
        pool.shutdown()


def main():
    p = evaluator_parser(__doc__, nsamples=32, fitness_windows=4)
    p.add_argument("--fidelity", choices=["proxy", "ppl"], default="ppl")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="1,2", help="comma list of worker counts")
    args = p.parse_args()
    evaluator = evaluator_settings(args)
    formulas = one_generation(SearchSettings(generations=1, population=args.population, seed=args.seed))
    jobs = [Job(formula, args.fidelity) for formula in formulas]
    build_evaluator(evaluator)  # fills the statistics cache outside the timed part
    counts = [int(w) for w in args.workers.split(",")]
    cluster.connect(None, num_cpus=max(counts))
    result = {"model": args.model, "fidelity": args.fidelity, "candidates": len(jobs)}
    baseline = None
    for workers in counts:
        seconds, results = timed_pool(evaluator, workers, jobs)
        fitness = [r["fitness"] for r in results]
        baseline = baseline or fitness
        result[f"workers_{workers}"] = {
            "seconds": round(seconds, 3),
            "candidates_per_s": round(len(jobs) / seconds, 4),
        }
        result[f"workers_{workers}"]["same_results_as_first"] = all(
            a == b or (math.isinf(a) and math.isinf(b)) for a, b in zip(fitness, baseline)
        )
    if len(counts) >= 2:
        first, last = result[f"workers_{counts[0]}"], result[f"workers_{counts[-1]}"]
        result["speedup"] = round(last["candidates_per_s"] / first["candidates_per_s"], 3)
    report(result, args.json)


if __name__ == "__main__":
    main()
