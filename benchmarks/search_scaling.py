"""Candidates per second of the metric search's evaluator pool with 1 and then 2 workers (one torch
thread each) on the same generation: the unique canonical forms of one seeded initial population,
evaluated at one fidelity; ``busy_fraction`` = time inside the evaluators / (workers x wall time). Actor
start-up is excluded (each pool first warms up on one job per worker); the statistics cache is filled
before timing. Target: 2 workers / 1 worker >= 1.8. The default generation of 48 measures throughput: in a
small one the last evaluation leaves a worker idle (16 give 15 distinct formulas, split 8 / 7 over two
workers, which alone caps the ratio near 1.85).

``--two-nodes``: on a local two-node Ray cluster (``ray.cluster_utils.Cluster``, one CPU per node, so
2 workers are one per node) with what a search joined by ``--address`` does: the driver prepares the
model, statistics and windows once and ships them through Ray's object store. It also times an actor's
start-up (created until its first proxy result) from the shipment against one that computes the
statistics itself (an empty cache folder): ``startup_ratio`` = computing / shipped.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import replace

from common import evaluator_parser, evaluator_settings, report

from fitness.setup import EvaluatorSettings, build_evaluator, prepare_shipment
from metric_search import cluster
from metric_search.config import SearchSettings
from metric_search.dispatch import EvaluatorPool, Job
from metric_search.engine import Engine


def one_generation(settings: SearchSettings) -> list[str]:
    """Distinct canonical forms of the seeded initial population, in population order."""
    return list(dict.fromkeys(ind.canonical for ind in Engine(settings).initial_population()))


def timed_pool(
    evaluator: EvaluatorSettings, workers: int, jobs: list[Job], shipment
) -> tuple[float, list[dict]]:
    pool = EvaluatorPool(evaluator.as_dict(), workers, 1, 0.0, hard_timeout=3600.0, shipment=shipment)
    try:
        pool.run([Job("abs(W) * X", jobs[0].fidelity)] * workers)  # every actor up, imports and caches warm
        started = time.perf_counter()
        results = pool.run(jobs)
        return time.perf_counter() - started, results
    finally:
        pool.shutdown()


def startup_seconds(evaluator: EvaluatorSettings, shipment) -> float:
    """One actor, from its creation to its first proxy result."""
    started = time.perf_counter()
    pool = EvaluatorPool(evaluator.as_dict(), 1, 1, 0.0, hard_timeout=3600.0, shipment=shipment)
    try:
        pool.run([Job("abs(W) * X", "proxy")])
        return time.perf_counter() - started
    finally:
        pool.shutdown()


def main():
    import ray

    p = evaluator_parser(__doc__, nsamples=32, fitness_windows=4)
    p.add_argument("--fidelity", choices=["proxy", "ppl"], default="ppl")
    p.add_argument("--population", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="1,2", help="comma list of worker counts")
    p.add_argument(
        "--two-nodes", action="store_true", help="a local two-node cluster, shipping as --address does"
    )
    p.add_argument("--no-startup", action="store_true", help="skip the start-up comparison (--two-nodes)")
    args = p.parse_args()
    evaluator = evaluator_settings(args)
    formulas = one_generation(SearchSettings(generations=1, population=args.population, seed=args.seed))
    jobs = [Job(formula, args.fidelity) for formula in formulas]
    build_evaluator(evaluator)  # fills the statistics cache outside the timed part
    counts = [int(w) for w in args.workers.split(",")]
    nodes, shipment = None, None
    if args.two_nodes:
        from ray.cluster_utils import Cluster

        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        nodes.add_node(num_cpus=1)
        cluster.connect(nodes.address, None)
        shipment = ray.put(prepare_shipment(evaluator))
    else:
        cluster.connect(None, num_cpus=max(counts))
    result = {
        "model": args.model,
        "fidelity": args.fidelity,
        "candidates": len(jobs),
        "two_nodes": args.two_nodes,
    }
    try:
        baseline = None
        for workers in counts:
            seconds, results = timed_pool(evaluator, workers, jobs, shipment)
            fitness = [r["fitness"] for r in results]
            baseline = baseline or fitness
            busy = sum(r["seconds"] for r in results)  # inside the evaluators, summed over jobs
            result[f"workers_{workers}"] = {
                "seconds": round(seconds, 3),
                "candidates_per_s": round(len(jobs) / seconds, 4),
                "evaluator_s": round(busy, 3),
                # below 1: workers waited (uneven jobs at the end, dispatch); with evaluator_s growing
                # with the worker count instead, the workers slowed each other (shared cores, memory)
                "busy_fraction": round(busy / (workers * seconds), 3),
            }
            result[f"workers_{workers}"]["same_results_as_first"] = all(
                a == b or (math.isinf(a) and math.isinf(b)) for a, b in zip(fitness, baseline)
            )
        if len(counts) >= 2:
            first, last = result[f"workers_{counts[0]}"], result[f"workers_{counts[-1]}"]
            result["speedup"] = round(last["candidates_per_s"] / first["candidates_per_s"], 3)
        if shipment is not None and not args.no_startup:
            shipped = startup_seconds(evaluator, shipment)
            with tempfile.TemporaryDirectory() as empty:
                computing = startup_seconds(replace(evaluator, cache_dir=empty), None)
            result["startup_s"] = {"shipped": round(shipped, 2), "computing": round(computing, 2)}
            result["startup_ratio"] = round(computing / shipped, 2)
    finally:
        ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
    report(result, args.json)


if __name__ == "__main__":
    main()
