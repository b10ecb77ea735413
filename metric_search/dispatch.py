"""A pool of evaluator actors on Ray: formula texts go out, results come back as they finish
(``ray.wait``) and are stored by job index, so the caller sees the same results whatever the
completion order. A job that outlives its deadline is marked ``timeout`` and its actor replaced; an
actor that dies is replaced and its job retried; a job that also kills an actor started after its first
death is marked ``lost``. Deaths on actors that were already dead when they got the job (killed together,
not yet noticed) do not count: how many actors die at once must not decide a candidate's result. An
actor that cannot be placed within ``placement_timeout`` is given up and the others take its jobs; with
none left the pool raises ``PoolError`` (the run stops; its results are on disk for ``--resume``)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from dataclasses import dataclass

import ray

from fitness.actor import EvaluatorActor

WARM_WAIT_S = 300.0  # how long the first jobs wait for slow-starting actors before using the ready ones
# An actor not up by then is given up (no room for it in the cluster, or its node is gone); its jobs run
# on the others. Long enough for an actor that computes the calibration statistics itself.
PLACEMENT_WAIT_S = 900.0
START_FAILURES_PER_WORKER = 2  # an actor that cannot even start twice in a row means a broken setup


class PoolError(Exception):
    """The actors cannot run at all (they fail while loading the model); one line, never per candidate."""


@dataclass(frozen=True)
class Job:
    formula: str
    fidelity: str


class PoolActor(EvaluatorActor):
    def where(self) -> dict:
        context = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node": context.get_node_id(),
            "resources": context.get_assigned_resources(),
        }


def _failure(reason: str, fidelity: str, seconds: float, detail: str) -> dict:
    return {"fitness": math.inf, "reason": reason, "fidelity": fidelity, "seconds": seconds, "detail": detail}


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line and "Traceback" not in line]
    return (useful[-1] if useful else lines[-1] if lines else type(err).__name__)[:300]


def _check_resources(workers: int, threads: int, gpu_share: float) -> None:
    """Actors that can never be placed would wait forever: say so instead."""
    total = ray.cluster_resources()
    needs = {"CPU": workers * threads, **({"GPU": workers * gpu_share} if gpu_share else {})}
    for resource, amount in needs.items():
        have = total.get(resource, 0)
        if have < amount - 1e-9:
            raise PoolError(
                f"{workers} workers x {threads} threads need {amount:g} {resource} but the Ray cluster has "
                f"{have:g}; pass fewer --workers or "
                + ("--threads" if resource == "CPU" else "more --actors-per-gpu")
            )


class _Worker:
    def __init__(self, handle, serial: int):
        self.handle, self.serial = handle, serial  # serial: creation order in the pool
        self.created = time.monotonic()
        self.ready = handle.where.remote()
        self.where: dict | None = None


class EvaluatorPool:
    def __init__(
        self, evaluator_settings: dict, workers: int, threads: int, gpu_share: float, hard_timeout: float,
        placement_timeout: float = PLACEMENT_WAIT_S, shipment=None,
    ):  # fmt: skip
        """``gpu_share``: the fraction of a GPU each actor reserves (0: CPU actors); ``shipment``: an
        object reference to a fitness.setup.Shipment every actor builds its evaluator from (None: each
        actor reads its node's files)."""
        options = {"num_cpus": threads, "max_restarts": 0, "scheduling_strategy": "SPREAD"}
        if gpu_share:
            options["num_gpus"] = gpu_share
        _check_resources(workers, threads, gpu_share)
        self._actor_class = ray.remote(**options)(PoolActor)
        self._settings, self._threads, self._shipment = evaluator_settings, threads, shipment
        self.hard_timeout, self.placement_timeout = hard_timeout, placement_timeout
        self.workers = workers
        self.unplaced = 0  # actors given up before they were up (for the report)
        self.start_failures = 0
        self.replaced = 0  # actors replaced after a death or a timeout (for the report)
        self._starting: dict = {}  # readiness ref -> worker
        self._idle: list[_Worker] = []
        self._busy: dict = {}  # result ref -> (worker, job index, start time)
        self._warming = True
        self._created = time.monotonic()
        self._serials = 0  # actors created so far
        for _ in range(workers):
            self._start_worker()

    # --- actors -------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        worker = _Worker(
            self._actor_class.remote(self._settings, self._threads, self._shipment), self._serials
        )
        self._serials += 1
        self._starting[worker.ready] = worker

    def _replace(self, worker: _Worker) -> None:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(worker.handle, no_restart=True)
        self.replaced += 1
        self._start_worker()

    def _started(self, ref) -> None:
        worker = self._starting.pop(ref)
        try:
            worker.where = ray.get(ref)
        except ray.exceptions.RayError as err:
            self.start_failures += 1
            if self.start_failures > START_FAILURES_PER_WORKER * self.workers:
                raise PoolError(f"evaluator actors fail to start: {_first_line(err)}") from err
            self._start_worker()
            return
        self.start_failures = 0
        self._idle.append(worker)

    def shutdown(self) -> None:
        for worker in [*self._idle, *self._starting.values(), *(w for w, _, _ in self._busy.values())]:
            with contextlib.suppress(Exception):
                ray.kill(worker.handle, no_restart=True)
        self._idle, self._starting, self._busy = [], {}, {}

    # --- jobs ---------------------------------------------------------------------------------

    def run(self, jobs: list[Job], on_result=None) -> list[dict]:
        """Results in job order; ``on_result(index, result, pool, where)`` after each job, where
        ``where`` is the pid and node of the actor that ran it."""
        results: list[dict | None] = [None] * len(jobs)
        deaths = [0] * len(jobs)
        fresh_from = [0] * len(jobs)  # a death counts on actors with at least this serial
        pending = deque(range(len(jobs)))

        def finish(index: int, result: dict, worker: _Worker) -> None:
            results[index] = result
            if on_result is not None:
                on_result(index, result, self, dict(worker.where or {}))

        while pending or self._busy:
            self._give_up_unplaced(pending)
            self._dispatch(jobs, pending)
            ready, _ = ray.wait([*self._busy, *self._starting], num_returns=1, timeout=self._wait_time())
            for ref in ready:
                if ref in self._starting:
                    self._started(ref)
                    continue
                worker, index, started = self._busy.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    if worker.serial >= fresh_from[index]:
                        deaths[index] += 1
                        fresh_from[index] = self._serials  # the replacement started next, and later ones
                    self._replace(worker)
                    if deaths[index] == 1:
                        pending.appendleft(index)  # retried first, on the next free actor
                    else:
                        detail = f"actor died twice: {_first_line(err)}"
                        finish(index, _failure("lost", jobs[index].fidelity, time.monotonic() - started, detail),
                               worker)  # fmt: skip
                    continue
                self._idle.append(worker)
                finish(index, result, worker)
            self._expire(jobs, finish)
        return results

    def _still_warming(self) -> bool:
        """The first jobs wait (a while) until every initial actor is up, so work spreads over all."""
        if self._warming and self._starting and time.monotonic() - self._created < WARM_WAIT_S:
            return True
        self._warming = False
        return False

    def _dispatch(self, jobs: list[Job], pending: deque) -> None:
        if self._still_warming():
            return
        while pending and self._idle:
            index, worker = pending.popleft(), self._idle.pop(0)
            job = jobs[index]
            ref = worker.handle.evaluate.remote(job.formula, job.fidelity)
            self._busy[ref] = (worker, index, time.monotonic())

    def _wait_time(self) -> float | None:
        """Until the next deadline: a job's, an actor's placement, or (before any job runs) warming."""
        deadlines = [started + self.hard_timeout for _, _, started in self._busy.values()]
        deadlines += [worker.created + self.placement_timeout for worker in self._starting.values()]
        if self._warming and not self._busy:
            deadlines.append(self._created + WARM_WAIT_S)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _give_up_unplaced(self, pending: deque) -> None:
        now = time.monotonic()
        late = [
            ref for ref, worker in self._starting.items() if now - worker.created >= self.placement_timeout
        ]
        for ref in late:
            with contextlib.suppress(Exception):
                ray.kill(self._starting.pop(ref).handle, no_restart=True)
            self.unplaced += 1
        if pending and not (self._idle or self._busy or self._starting):
            raise PoolError(
                f"no evaluator actor is left: {self.unplaced} could not be placed within "
                f"{self.placement_timeout:.0f} s (the cluster lacks their CPUs/GPUs, or their node is gone)"
            )

    def _expire(self, jobs: list[Job], finish) -> None:
        now = time.monotonic()
        late = [(ref, entry) for ref, entry in self._busy.items() if now - entry[2] >= self.hard_timeout]
        for ref, (worker, index, started) in late:
            del self._busy[ref]
            self._replace(worker)  # the actor may be stuck inside a kernel: only a new process is sure
            detail = f"no result within {self.hard_timeout:.0f} s; actor replaced"
            finish(index, _failure("timeout", jobs[index].fidelity, now - started, detail), worker)
