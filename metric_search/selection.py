"""The fidelity ladder's decisions: which formulas climb a rung, and how two formulas compare.

Two formulas compare at the highest rung both reached (so a cheap proxy never outranks a perplexity
and two perplexities on the same windows are compared as they are); the hall of fame ranks by the
highest rung reached first, so its head is always measured on the most windows.

Every ordering ends in (formula size, canonical text), so selection never depends on dict order,
completion order of remote tasks, or anything outside the state.
"""

from __future__ import annotations

import functools
import math
import random
import statistics

from fitness.evaluator import FIDELITIES, TRANSIENT

# A formula climbs to the top rung only if its base perplexity is among the best quarter (at least 5) of
# everything measured there. A fixed best 5 starved the top rung: at 2:4 the one-shot base rung barely
# predicts the top (Spearman -0.1 to 0.5 over the formulas that climbed), a few early base outliers held
# the bar, and from the third generation on 0-1 formulas a generation climbed instead of --promote.
TOP_ELIGIBLE_RANK = 5
TOP_ELIGIBLE_FRACTION = 0.25


def value(entry: dict, fidelity: str) -> float | None:
    result = entry.get(fidelity)
    return None if result is None else result["fitness"]


def is_invalid(entry: dict) -> bool:
    return any(value(entry, f) == math.inf for f in FIDELITIES)


def highest_rung(entry: dict) -> int:
    """Index in FIDELITIES of the highest rung with a finite result; -1 for none (or invalid)."""
    if is_invalid(entry):
        return -1
    reached = [i for i, f in enumerate(FIDELITIES) if value(entry, f) is not None]
    return max(reached, default=-1)


def _tie_break(key: str, entry: dict) -> tuple:
    return entry.get("size", 0), key


def compare(a: tuple[str, dict], b: tuple[str, dict]) -> int:
    """-1 when ``a`` is better, 1 when ``b`` is, at the highest rung both reached; 0 only for a == b."""
    (ka, ea), (kb, eb) = a, b
    ra, rb = highest_rung(ea), highest_rung(eb)
    if ra < 0 or rb < 0:
        if ra != rb:
            return -1 if rb < 0 else 1
    else:
        shared = FIDELITIES[min(ra, rb)]
        va, vb = value(ea, shared), value(eb, shared)
        if va != vb:
            return -1 if va < vb else 1
    ta, tb = _tie_break(ka, ea), _tie_break(kb, eb)
    return (ta > tb) - (ta < tb)


def rank_key(key: str, entry: dict) -> tuple:
    """Hall-of-fame order, lower is better: (highest rung reached, descending; its value; size; key)."""
    rung = highest_rung(entry)
    fitness = math.inf if rung < 0 else value(entry, FIDELITIES[rung])
    return -rung, fitness, *_tie_break(key, entry)


def distinct_results(keys, candidates: dict) -> list[str]:
    """``keys`` without those whose results equal an earlier key's at every rung: two formulas the
    canonical form could not merge (e.g. ``sqrt(X) * abs(W)`` and ``sqrt(X) * (abs(W) + rownorm(abs(W)))``,
    rank-equivalent within rows) that prune the very same weights measure bit-identical perplexities."""
    seen, distinct = set(), []
    for key in keys:
        results = tuple(value(candidates[key], f) for f in FIDELITIES)
        if results not in seen:
            seen.add(results)
            distinct.append(key)
    return distinct


def unique_in_order(keys) -> list[str]:
    return list(dict.fromkeys(keys))


def needing(keys, candidates: dict, fidelity: str) -> list[str]:
    """Distinct keys, in population order, with no result yet at ``fidelity`` and not known invalid."""
    return [
        k
        for k in unique_in_order(keys)
        if candidates[k].get(fidelity) is None and not is_invalid(candidates[k])
    ]


def best_at(keys, candidates: dict, fidelity: str) -> list[str]:
    """``keys`` (each measured at ``fidelity``) best first by their value there."""
    return sorted(keys, key=lambda k: (value(candidates[k], fidelity), *_tie_break(k, candidates[k])))


def to_promote(keys, candidates: dict, fidelity: str, count: int) -> list[str]:
    """Successive halving: the ``count`` best at the rung below ``fidelity`` that lack ``fidelity``.
    The top rung takes only formulas whose base perplexity is among the best TOP_ELIGIBLE_FRACTION (at
    least TOP_ELIGIBLE_RANK) of everything measured so far (a top measurement is for contenders, not for
    the best of a weak lot)."""
    below = FIDELITIES[FIDELITIES.index(fidelity) - 1]
    known_below = [k for k in needing(keys, candidates, fidelity) if value(candidates[k], below) is not None]
    ready = best_at(known_below, candidates, below)
    if fidelity == FIDELITIES[-1]:
        measured = sorted(
            value(e, below) for e in candidates.values() if not is_invalid(e) and value(e, below) is not None
        )
        rank = max(TOP_ELIGIBLE_RANK, math.ceil(TOP_ELIGIBLE_FRACTION * len(measured)))
        bar = measured[min(rank, len(measured)) - 1] if measured else math.inf
        ready = [k for k in ready if value(candidates[k], below) <= bar]
    return ready[:count]


def ordered(keys, candidates: dict) -> list[str]:
    """Distinct keys, best first, compared pairwise at the highest rung both reached."""
    cmp = functools.cmp_to_key(lambda a, b: compare((a, candidates[a]), (b, candidates[b])))
    return sorted(unique_in_order(keys), key=cmp)


def best_unique(keys, candidates: dict, count: int) -> list[str]:
    """The ``count`` best distinct valid keys (pairwise comparison), best first."""
    return [k for k in ordered(keys, candidates) if highest_rung(candidates[k]) >= 0][:count]


def update_hall_of_fame(hall: list[str], keys, candidates: dict, size: int) -> list[str]:
    """Unique formulas measured by perplexity, the highest rung first, best first within a rung."""
    pool = [k for k in unique_in_order([*hall, *keys]) if highest_rung(candidates[k]) >= 1]
    return sorted(pool, key=lambda k: rank_key(k, candidates[k]))[:size]


def tournament(rng: random.Random, keys: list[str], candidates: dict, rounds: int, size: int) -> list[int]:
    """Indices of ``rounds`` winners, each the best of ``size`` members drawn with replacement, compared
    pairwise at the highest rung both reached."""
    winners = []
    for _ in range(rounds):
        drawn = [rng.randrange(len(keys)) for _ in range(size)]
        best = drawn[0]
        for index in drawn[1:]:
            if compare((keys[index], candidates[keys[index]]), (keys[best], candidates[keys[best]])) < 0:
                best = index
        winners.append(best)
    return winners


def drop_transient(candidates: dict) -> int:
    """Forget failures of the machine (timeout, out of memory, a lost actor): the formula is tried
    again when it is next needed. Returns how many results were dropped."""
    dropped = 0
    for entry in candidates.values():
        for fidelity in FIDELITIES:
            result = entry.get(fidelity)
            if result is not None and result.get("reason") in TRANSIENT:
                entry[fidelity] = None
                dropped += 1
    return dropped


def summarize(keys, candidates: dict) -> dict:
    """Best and median fitness of the population at each rung (finite values only)."""
    summary = {}
    for fidelity in FIDELITIES:
        values = [value(candidates[k], fidelity) for k in keys]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        summary[f"best_{fidelity}"] = min(finite) if finite else None
        summary[f"median_{fidelity}"] = statistics.median(finite) if finite else None
    return summary
