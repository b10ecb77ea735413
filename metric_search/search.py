"""The search loop: baselines, then generations of variation -> canonical forms -> multi-fidelity
evaluation on the actor pool -> hall of fame -> checkpoint. Decisions read only the checkpointed
state; the memo on disk (candidates.jsonl) is a cache, so a resumed run takes the same decisions."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from fitness.evaluator import FIDELITIES, REASONS, TRANSIENT
from fitness.memo import Memo
from fitness.setup import resolved_numbers
from metric_search import rundir
from metric_search.checkpoint import TUNING_PARENT, SearchState, load_checkpoint, save_checkpoint
from metric_search.config import (
    BASELINES,
    CONFIG_VERSION,
    TOP_BASELINE_FACTOR,
    ExecutionSettings,
    SearchSettings,
)
from metric_search.dispatch import EvaluatorPool, Job
from metric_search.engine import Engine, Individual
from metric_search.final import REFERENCE
from metric_search.report import write_report
from metric_search.results import write_progress_files
from metric_search.selection import (
    best_at,
    distinct_results,
    drop_transient,
    needing,
    ordered,
    summarize,
    to_promote,
    unique_in_order,
    update_hall_of_fame,
    value,
)
from primitives import KNOWN_FORMULAS, canonical_key, parse_formula
from primitives.tree import size
from pruning_core import files
from pruning_core.errors import UsageError


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
        "numbers": resolved_numbers(settings.evaluator),
        "execution": {
            "workers": execution.workers,
            "threads": execution.threads,
            "address": execution.address,
        },
    }
    files.atomic_write_json(run_dir / rundir.CONFIG, config)
    save_checkpoint(run_dir, SearchState(rng=Engine(settings).rng.getstate()))


def _lite(result: dict) -> dict:
    """What the state keeps of a result (the memo keeps the detail)."""
    lite = {
        "fitness": float(result["fitness"]),
        "reason": result.get("reason"),
        "seconds": result.get("seconds", 0.0),
    }
    if result.get("values"):
        lite["values"] = dict(result["values"])
    return lite


class _Evaluations:
    """Results of canonical forms at a fidelity: from the memo when known, else from the pool."""

    def __init__(self, pool: EvaluatorPool, memo: Memo, progress: bool, observer=None):
        self.pool, self.memo, self.progress, self.observer = pool, memo, progress, observer

    def fetch(self, keys: list[str], fidelity: str, tally: Counter, label: str) -> dict[str, dict]:
        results, todo = {}, []
        for key in keys:
            cached = self.memo.get(key, fidelity)
            if cached is not None and cached.get("reason") not in TRANSIENT:  # a machine failure: retry
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

            began = time.monotonic()
            try:
                fresh = self.pool.run([Job(key, fidelity) for key in todo], on_result=done)
            finally:
                bar.close()
            tally[f"seconds_{fidelity}"] += time.monotonic() - began  # wall time: throughput of the pool
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
        # A timeout, an out-of-memory or a lost actor holds for the rest of a run's session; a resume
        # (perhaps on a sounder machine) tries those formulas again when they are next needed.
        self.retried = drop_transient(self.state.candidates)
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
                    **{fidelity: known.get(fidelity) for fidelity in FIDELITIES},
                }

    def _store(self, results: dict[str, dict], fidelity: str) -> None:
        for key, result in results.items():
            self.state.candidates[key][fidelity] = _lite(result)

    def _checkpoint(self) -> None:
        """Checkpoint first, then the readable files derived from it; a kill in between loses nothing."""
        self.state.rng = self.engine.rng.getstate()
        save_checkpoint(self.run_dir, self.state)
        write_progress_files(self.run_dir, self.config, self.state)

    def _update_hall_of_fame(self, keys: list[str]) -> None:
        self.state.hall_of_fame = update_hall_of_fame(
            self.state.hall_of_fame, keys, self.state.candidates, self.settings.hof_size
        )

    # --- stages --------------------------------------------------------------------------------

    def _baselines(self, evaluations: _Evaluations) -> None:
        group = self.engine.group
        tally: Counter = Counter()
        for name in BASELINES:
            text = KNOWN_FORMULAS[name]
            self.state.baselines[name] = {"formula": text, "canonical": canonical_key(text, group)}
        for fidelity in FIDELITIES:
            entries = [e for e in self.state.baselines.values() if self._baseline_climbs(e, fidelity)]
            keys = list(dict.fromkeys(entry["canonical"] for entry in entries))
            results = evaluations.fetch(keys, fidelity, tally, "baselines")
            for entry in entries:
                entry[fidelity] = _lite(results[entry["canonical"]])
        self._checkpoint()

    def _baseline_climbs(self, entry: dict, fidelity: str) -> bool:
        """Every rung below the top; the top for Wanda and those close to it (TOP_BASELINE_FACTOR)."""
        if fidelity != FIDELITIES[-1]:
            return True
        below = FIDELITIES[-2]
        reference, own = value(self.state.baselines[REFERENCE], below), value(entry, below)
        return reference is None or (own is not None and own <= TOP_BASELINE_FACTOR * reference)

    def _evaluate(self, keys: list[str], evaluations: _Evaluations, tally: Counter, label: str,
                  tuning: tuple[str | None, list[str]] = (None, []),
                  hold: bool = False) -> list[str]:  # fmt: skip
        """Up the ladder: the proxy for every new formula (unless single-fidelity), base perplexity for
        the best ``confirm`` by proxy (every new one without the proxy), the top rung for the best
        ``promote`` by base perplexity. ``tuning``: a parent measured at the top rung and its variants
        (see ``_tuning_parent``), which climb with the population: every variant gets the proxy and base
        perplexity, the top rung those that beat the parent's base perplexity. One fetch per rung for
        both, so a generation's tops and its variants' run side by side on the pool's workers.
        ``hold``: the top rung runs in whole batches of ``promote`` (see ``_top_batch``). Returns the
        formulas measured at the top rung."""
        s, candidates = self.settings, self.state.candidates
        parent, variants = tuning
        if s.multi_fidelity:
            proxy = needing([*keys, *variants], candidates, "proxy")
            self._store(evaluations.fetch(proxy, "proxy", tally, label), "proxy")
            base = to_promote(keys, candidates, "ppl", s.confirm)
        else:
            base = needing(keys, candidates, "ppl")
        base += needing(variants, candidates, "ppl")
        self._store(evaluations.fetch(base, "ppl", tally, label), "ppl")
        climbing = []
        if parent is not None:
            parent_ppl = value(candidates[parent], "ppl")
            climbing = [
                k for k in needing(variants, candidates, "top") if value(candidates[k], "ppl") < parent_ppl
            ]
        top = self._top_batch(to_promote(keys, candidates, "top", s.promote), climbing, hold)
        self._store(evaluations.fetch(top, "top", tally, label), "top")
        return top

    def _top_batch(self, promoted: list[str], climbing: list[str], hold: bool) -> list[str]:
        """The formulas for the top rung now: those promoted and the tuning variants ``climbing`` now, and
        those held before (a held formula of the population only while still eligible), best first by
        base perplexity, less what would leave a batch short: with ``hold``, the last ``count % promote``
        wait in the state for the next generation's batch. A top-rung prune costs as much as a generation's
        other rungs together, and one alone leaves all but one worker idle (CPU profile: promote = the two
        workers); the waiting list stays shorter than ``promote``, and the last generation holds nothing."""
        candidates = self.state.candidates
        waiting = needing(self.state.waiting, candidates, "top")
        variants = [k for k in waiting if TUNING_PARENT in candidates[k]] + climbing
        formulas = [k for k in waiting if TUNING_PARENT not in candidates[k]] + promoted
        queued = to_promote(formulas, candidates, "top", len(formulas))  # re-ranked: the bar may have moved
        queued = best_at(unique_in_order([*queued, *variants]), candidates, "ppl")
        held = len(queued) % self.settings.promote if hold else 0
        self.state.waiting = queued[len(queued) - held :]
        return queued[: len(queued) - held]

    def _untried_neighbours(self, key: str) -> list[Individual]:
        """Up to ``tune`` formulas one constant step from ``key`` that were never measured."""
        from primitives.tuning import constant_neighbours

        variants: list[Individual] = []
        for text in constant_neighbours(key, self.engine.group):
            try:
                variant = self.engine.from_text(text)
            except UsageError:
                continue  # a constant the GP cannot hold
            if variant.canonical not in self.state.candidates and variant.canonical not in {
                v.canonical for v in variants
            }:
                variants.append(variant)
            if len(variants) == self.settings.tune:
                break
        return variants

    def _tuning_parent(self) -> tuple[str | None, list[Individual]]:
        """The formula to tune and its untried variants: of the hall of fame's formulas measured at the
        top rung, the one with the fewest steps measured so far that still has untried ones (ties: the
        better). Tuning so spreads over the top formulas instead of spending every generation on the
        head's steps while a close second (e.g. RIA one exponent step from a better formula) waits."""
        from primitives.canonical import canonical_key
        from primitives.tuning import constant_neighbours

        candidates, group = self.state.candidates, self.engine.group
        at_top = []
        for rank, key in enumerate(self.state.hall_of_fame):
            if value(candidates[key], "top") is None:
                break  # the hall of fame lists the top rung's formulas first
            measured = sum(canonical_key(t, group) in candidates for t in constant_neighbours(key, group))
            at_top.append((measured, rank, key))
        for _, _, key in sorted(at_top):
            variants = self._untried_neighbours(key)
            if variants:
                return key, variants
        return None, []

    def _register_variants(self, parent: str, variants: list[Individual], generation: int) -> None:
        """Variants join the state with their parent: one held for a later top-rung batch is judged
        against that parent when it is measured."""
        self._register(variants, generation)
        for variant in variants:
            self.state.candidates[variant.canonical][TUNING_PARENT] = parent

    def _adopt(self, population: list[Individual], measured: list[str], variants: list[Individual],
               tally: Counter) -> list[Individual]:  # fmt: skip
        """Tuning variants just measured at the top rung (``measured``; this generation's ``variants`` or
        held ones) that beat their parent there replace the population's worst."""
        candidates = self.state.candidates
        made = {v.canonical: v for v in variants}
        members = {ind.canonical for ind in population}
        better = []
        for key in measured:
            parent = candidates[key].get(TUNING_PARENT)
            if parent is None or key in members:
                continue
            top, parent_top = value(candidates[key], "top"), value(candidates[parent], "top")
            if top is not None and parent_top is not None and top < parent_top:
                better.append(made[key] if key in made else self.engine.from_text(key))
        tally["tuned"] += len(better)
        if not better:
            return population
        rank = {k: i for i, k in enumerate(ordered([ind.canonical for ind in population], candidates))}
        worst_first = sorted(range(len(population)), key=lambda i: (-rank[population[i].canonical], -i))
        dropped = set(worst_first[: len(better)])
        return [ind for i, ind in enumerate(population) if i not in dropped] + better

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
        # what is known of the population so far (a seed formula carries a baseline's top rung) ranks
        # the formulas a tuning parent is drawn from
        self._update_hall_of_fame(keys)
        parent, variants = self._tuning_parent() if self.settings.tune else (None, [])
        self._register_variants(parent, variants, generation)
        tuning = (parent, [v.canonical for v in variants])
        hold = generation < self.settings.generations - 1
        measured = self._evaluate(keys, evaluations, tally, f"gen {generation}", tuning, hold)
        population = self._adopt(population, measured, variants, tally)
        keys = [ind.canonical for ind in population]
        # a formula held earlier may be measured now though it left the population
        self._update_hall_of_fame([*keys, *(ind.canonical for ind in elites + offspring), *measured])
        self.state.population = [(ind.formula, ind.canonical) for ind in population]
        self.state.generation = generation
        self.state.history.append(self._summary(generation, offspring_keys, known, keys, tally, started))
        self._checkpoint()
        write_report(self.run_dir, self.config, self.state)
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
            "evaluated": {f: tally[f"evaluated_{f}"] for f in FIDELITIES},
            "cache_hits": tally["cache_hits"],
            "tuned": tally["tuned"],
            "waiting": len(self.state.waiting),
            "invalid": {r: tally[f"invalid_{r}"] for r in REASONS},
            **summarize(keys, self.state.candidates),
            "hall_of_fame_best": self.state.hall_of_fame[0] if self.state.hall_of_fame else None,
            "per_minute": {
                f: round(60.0 * tally[f"evaluated_{f}"] / tally[f"seconds_{f}"], 3)
                for f in FIDELITIES
                if tally[f"seconds_{f}"] > 0
            },
            "seconds": round(time.monotonic() - started, 3),
        }

    def _best_line(self) -> str:
        """The progress bar's note: the hall of fame's head and its ratio to Wanda at the same rung."""
        if not self.state.hall_of_fame:
            return "no formula measured yet"
        key = self.state.hall_of_fame[0]
        entry = self.state.candidates[key]
        rung = next(f for f in reversed(FIDELITIES) if value(entry, f) is not None)
        wanda = value(self.state.baselines.get(REFERENCE, {}), rung)
        ratio = f" {value(entry, rung) / wanda:.3f}x wanda" if wanda else ""
        rates = self.state.history[-1].get("per_minute", {}) if self.state.history else {}
        speed = "; per min " + " ".join(f"{f} {rate:g}" for f, rate in rates.items()) if rates else ""
        return f"best {key[:60]} ({rung}{ratio}){speed}"

    def run(self) -> SearchState:
        """The generations (unless done), then the final check (unless done); resumable at any point."""
        s = self.settings
        if self.state.generation + 1 < s.generations or not self.state.baselines:
            self._evolve()
        if s.final_top and self.state.final is None and self.state.hall_of_fame:
            from metric_search.final import final_check

            # a formula that prunes exactly as a better-ranked one would take a final slot for nothing
            heads = distinct_results(self.state.hall_of_fame, self.state.candidates)
            self.state.final = final_check(s, heads, self.engine.group, self.execution.progress)
            self._checkpoint()
            write_report(self.run_dir, self.config, self.state)
        return self.state

    def _evolve(self) -> None:
        from metric_search import cluster

        s, x = self.settings, self.execution
        rundir.remove_stale_temps(self.run_dir)
        memo = Memo(self.run_dir / rundir.CANDIDATES)
        population = [self.engine.from_text(formula) for formula, _ in self.state.population]
        started_ray = cluster.connect(
            x.address, x.workers * x.threads if x.workers else None, x.use_gpu, x.runtime_env
        )
        try:
            import ray

            workers, gpu_share = cluster.actor_layout(
                x.workers, x.threads, x.actors_per_gpu, s.evaluator.device, ray.cluster_resources()
            )
            shipment = None
            if x.address is not None:  # other nodes: the model, statistics and windows travel with Ray
                from fitness.setup import prepare_shipment

                shipment = ray.put(prepare_shipment(s.evaluator, x.progress))
            pool = EvaluatorPool(
                s.evaluator.as_dict(), workers, x.threads, gpu_share, x.hard_timeout, shipment=shipment
            )
            try:
                evaluations = _Evaluations(pool, memo, x.progress, self.observer)
                if not self.state.baselines:
                    self._baselines(evaluations)
                bar = _progress(s.generations, "generations", x.progress, initial=self.state.generation + 1)
                for generation in range(self.state.generation + 1, s.generations):
                    population = self._generation(generation, population, evaluations)
                    bar.update(1)
                    bar.set_postfix_str(self._best_line(), refresh=True)
                bar.close()
                self.actors_replaced = pool.replaced
            finally:
                pool.shutdown()
        finally:
            if started_ray:
                import ray

                ray.shutdown()
