"""The search loop: baselines, then generations of variation -> canonical forms -> multi-fidelity
evaluation on the actor pool -> hall of fame -> checkpoint. Decisions read only the checkpointed
state; the memo on disk (candidates.jsonl) is a cache, so a resumed run takes the same decisions."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from fitness.memo import Memo
from metric_search import rundir
from metric_search.checkpoint import SearchState, load_checkpoint, save_checkpoint
from metric_search.config import BASELINES, CONFIG_VERSION, ExecutionSettings, SearchSettings
from metric_search.dispatch import EvaluatorPool, Job
from metric_search.engine import Engine, Individual
from metric_search.results import write_progress_files
from metric_search.selection import needing, summarize, to_confirm, update_hall_of_fame
from primitives import KNOWN_FORMULAS, canonical_key, parse_formula
from primitives.tree import size


def _progress(total: int, desc: str, enabled: bool, initial: int = 0, leave: bool = True):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        leave=leave,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def start_run(settings: SearchSettings, run_dir: Path, run_id: str, execution: ExecutionSettings) -> None:
    """Create the run directory with its config and an initial checkpoint (so a kill at any point
    after this can be resumed)."""
    rundir.prepare_new_run_dir(run_dir)
    config = {
        "version": CONFIG_VERSION,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings.as_dict(),
        "execution": {
            "workers": execution.workers,
            "threads": execution.threads,
            "address": execution.address,
        },
    }
    rundir.atomic_write_json(run_dir / rundir.CONFIG, config)
    save_checkpoint(run_dir, SearchState(rng=Engine(settings).rng.getstate()))


def _lite(result: dict) -> dict:
    """What the state keeps of a result (the memo keeps the detail)."""
    return {
        "fitness": float(result["fitness"]),
        "reason": result.get("reason"),
        "seconds": result.get("seconds", 0.0),
    }


class _Evaluations:
    """Results of canonical forms at a fidelity: from the memo when known, else from the pool."""

    def __init__(self, pool: EvaluatorPool, memo: Memo, progress: bool, observer=None):
        self.pool, self.memo, self.progress, self.observer = pool, memo, progress, observer

    def fetch(self, keys: list[str], fidelity: str, tally: Counter, label: str) -> dict[str, dict]:
        results, todo = {}, []
        for key in keys:
            cached = self.memo.get(key, fidelity)
            if cached is not None:
                results[key] = cached
                tally["cache_hits"] += 1
            else:
                todo.append(key)
        if todo:
            bar = _progress(len(todo), f"{label} {fidelity}", self.progress, leave=False)

            def done(index, result, pool, where):
                # On disk as soon as it arrives: a killed driver loses only the jobs still in flight.
                self.memo.put(todo[index], fidelity, dict(result, label=label))
                bar.update(1)
                if self.observer is not None:
                    self.observer(
                        "result", label=label, fidelity=fidelity, result=result, pool=pool, where=where
                    )

            try:
                fresh = self.pool.run([Job(key, fidelity) for key in todo], on_result=done)
            finally:
                bar.close()
            for key, result in zip(todo, fresh):
                results[key] = self.memo.get(key, fidelity)
                tally[f"evaluated_{fidelity}"] += 1
                if result["reason"]:
                    tally[f"invalid_{result['reason']}"] += 1
        return results


class Search:
    def __init__(self, settings: SearchSettings, execution: ExecutionSettings, run_dir: Path, observer=None):
        self.settings, self.execution, self.run_dir = settings, execution, Path(run_dir)
        self.observer = observer
        self.actors_replaced = 0
        self.engine = Engine(settings)
        self.config = json.loads((self.run_dir / rundir.CONFIG).read_text())
        self.state = load_checkpoint(self.run_dir, parse_formula)
        self.engine.rng.setstate(self.state.rng)

    # --- bookkeeping ---------------------------------------------------------------------------

    def _register(self, population: list[Individual], generation: int) -> None:
        """New canonical forms join the state; a baseline's results come with it (the confirmation
        budget then goes to formulas not measured yet)."""
        baselines = {entry["canonical"]: entry for entry in self.state.baselines.values()}
        for ind in population:
            if ind.canonical not in self.state.candidates:
                known = baselines.get(ind.canonical, {})
                self.state.candidates[ind.canonical] = {
                    "formula": ind.canonical,
                    "size": size(parse_formula(ind.canonical)),
                    "generation": generation,
                    "proxy": known.get("proxy"),
                    "ppl": known.get("ppl"),
                }

    def _store(self, results: dict[str, dict], fidelity: str) -> None:
        for key, result in results.items():
            self.state.candidates[key][fidelity] = _lite(result)

    def _checkpoint(self) -> None:
        """Checkpoint first, then the readable files derived from it; a kill in between loses nothing."""
        self.state.rng = self.engine.rng.getstate()
        save_checkpoint(self.run_dir, self.state)
        write_progress_files(self.run_dir, self.config, self.state)

    # --- stages --------------------------------------------------------------------------------

    def _baselines(self, evaluations: _Evaluations) -> None:
        group = self.engine.group
        tally: Counter = Counter()
        for name in BASELINES:
            text = KNOWN_FORMULAS[name]
            self.state.baselines[name] = {"formula": text, "canonical": canonical_key(text, group)}
        keys = [entry["canonical"] for entry in self.state.baselines.values()]
        for fidelity in ("proxy", "ppl"):
            results = evaluations.fetch(list(dict.fromkeys(keys)), fidelity, tally, "baselines")
            for entry in self.state.baselines.values():
                entry[fidelity] = _lite(results[entry["canonical"]])
        self._checkpoint()

    def _evaluate(self, keys: list[str], evaluations: _Evaluations, tally: Counter, label: str) -> None:
        s, candidates = self.settings, self.state.candidates
        if s.multi_fidelity:
            self._store(evaluations.fetch(needing(keys, candidates, "proxy"), "proxy", tally, label), "proxy")
            self._store(
                evaluations.fetch(to_confirm(keys, candidates, s.confirm), "ppl", tally, label), "ppl"
            )
        else:
            self._store(evaluations.fetch(needing(keys, candidates, "ppl"), "ppl", tally, label), "ppl")

    def _generation(self, generation: int, population: list[Individual], evaluations) -> list[Individual]:
        started = time.monotonic()
        if generation == 0:
            elites, offspring = [], self.engine.initial_population()
        else:
            elites, offspring = self.engine.next_generation(population, self.state.candidates)
        population = elites + offspring
        offspring_keys = [ind.canonical for ind in offspring]
        known = {k for k in offspring_keys if k in self.state.candidates}
        self._register(population, generation)
        tally: Counter = Counter()
        keys = [ind.canonical for ind in population]
        self._evaluate(keys, evaluations, tally, f"gen {generation}")
        self.state.hall_of_fame = update_hall_of_fame(
            self.state.hall_of_fame, keys, self.state.candidates, self.settings.hof_size
        )
        self.state.population = [(ind.formula, ind.canonical) for ind in population]
        self.state.generation = generation
        self.state.history.append(self._summary(generation, offspring_keys, known, keys, tally, started))
        self._checkpoint()
        if self.observer is not None:
            self.observer("generation", generation=generation, summary=self.state.history[-1])
        return population

    def _summary(
        self, generation: int, offspring_keys, known: set, keys, tally: Counter, started: float
    ) -> dict:
        """One line of generations.jsonl: what was new, what cost nothing, what failed, how good."""
        unique = len(set(offspring_keys))
        return {
            "generation": generation,
            "offspring": len(offspring_keys),
            "unique": unique,
            "duplicates": len(offspring_keys) - unique,
            "memo_hits": len(known),
            "new": unique - len(known),
            "evaluated": {f: tally[f"evaluated_{f}"] for f in ("proxy", "ppl")},
            "cache_hits": tally["cache_hits"],
            "invalid": {r: tally[f"invalid_{r}"] for r in ("nonfinite", "constant", "error", "timeout")},
            **summarize(keys, self.state.candidates),
            "hall_of_fame_best": self.state.hall_of_fame[0] if self.state.hall_of_fame else None,
            "seconds": round(time.monotonic() - started, 3),
        }

    def run(self) -> SearchState:
        from metric_search import cluster

        s, x = self.settings, self.execution
        rundir.remove_stale_temps(self.run_dir)
        rundir.drop_torn_tail(self.run_dir / rundir.CANDIDATES)
        memo = Memo(self.run_dir / rundir.CANDIDATES)
        population = [self.engine.from_text(formula) for formula, _ in self.state.population]
        if self.state.generation + 1 >= s.generations and self.state.baselines:
            return self.state  # finished already; the caller only rewrites the report
        started_ray = cluster.connect(x.address, x.workers * x.threads, x.use_gpu)
        try:
            pool = EvaluatorPool(s.evaluator.as_dict(), x.workers, x.threads, x.use_gpu, x.hard_timeout)
            try:
                evaluations = _Evaluations(pool, memo, x.progress, self.observer)
                if not self.state.baselines:
                    self._baselines(evaluations)
                bar = _progress(s.generations, "generations", x.progress, initial=self.state.generation + 1)
                for generation in range(self.state.generation + 1, s.generations):
                    population = self._generation(generation, population, evaluations)
                    bar.update(1)
                    summary = self.state.history[-1]
                    bar.set_postfix(best_ppl=summary["best_ppl"], new=summary["new"])
                bar.close()
                self.actors_replaced = pool.replaced
            finally:
                pool.shutdown()
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        return self.state
