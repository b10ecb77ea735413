"""Multi-fidelity ranking: the cheap proxy screens every new candidate, perplexity confirms the most
promising few; a confirmed candidate always ranks above one known only by its proxy.

Every ordering here is total (fitness, then formula size, then the canonical text), so selection
never depends on dict order, completion order of remote tasks, or anything outside the state.
"""

from __future__ import annotations

import math
import random
import statistics

CONFIRMED, SCREENED, INVALID = 0, 1, 2


def _value(entry: dict, fidelity: str) -> float | None:
    result = entry.get(fidelity)
    return None if result is None else result["fitness"]


def is_invalid(entry: dict) -> bool:
    return any(_value(entry, f) == math.inf for f in ("proxy", "ppl"))


def rank_key(key: str, entry: dict) -> tuple:
    """Lower is better: (tier, fitness of that tier, size, canonical text)."""
    ppl, proxy = _value(entry, "ppl"), _value(entry, "proxy")
    if is_invalid(entry):
        tier, value = INVALID, math.inf
    elif ppl is not None:
        tier, value = CONFIRMED, ppl
    elif proxy is not None:
        tier, value = SCREENED, proxy
    else:
        tier, value = INVALID, math.inf  # not evaluated yet: never preferred
    return tier, value, entry.get("size", 0), key


def screening_key(key: str, entry: dict) -> tuple:
    """Tournament order under multi-fidelity: every candidate has a proxy, so all compete on it (a
    perplexity-confirmed one would otherwise win every tournament it enters and take the population
    over); failed or unmeasured candidates last."""
    proxy = _value(entry, "proxy")
    if is_invalid(entry) or proxy is None:
        return INVALID, math.inf, entry.get("size", 0), key
    return SCREENED, proxy, entry.get("size", 0), key


def unique_in_order(keys) -> list[str]:
    return list(dict.fromkeys(keys))


def needing(keys, candidates: dict, fidelity: str) -> list[str]:
    """Distinct keys, in population order, with no result yet at ``fidelity`` and not known invalid."""
    return [
        k
        for k in unique_in_order(keys)
        if candidates[k].get(fidelity) is None and not is_invalid(candidates[k])
    ]


def to_confirm(keys, candidates: dict, count: int) -> list[str]:
    """Successive-halving step: the ``count`` best screened candidates that perplexity has not seen."""
    screened = [k for k in needing(keys, candidates, "ppl") if candidates[k].get("proxy") is not None]
    screened.sort(key=lambda k: (candidates[k]["proxy"]["fitness"], candidates[k].get("size", 0), k))
    return screened[:count]


def best_unique(keys, candidates: dict, count: int, tier_limit: int = INVALID) -> list[str]:
    """The ``count`` best distinct keys whose tier is below ``tier_limit``, best first."""
    ranked = sorted(rank_key(k, candidates[k]) for k in unique_in_order(keys))
    return [r[3] for r in ranked if r[0] < tier_limit][:count]


def update_hall_of_fame(hall: list[str], keys, candidates: dict, size: int) -> list[str]:
    """Unique canonical forms confirmed by perplexity, best first."""
    return best_unique([*hall, *keys], candidates, size, tier_limit=SCREENED)


def tournament(rng: random.Random, keys: list[str], candidates: dict, rounds: int, size: int,
               order=rank_key) -> list[int]:  # fmt: skip
    """Indices of ``rounds`` winners, each the best by ``order`` of ``size`` members drawn with replacement."""
    winners = []
    for _ in range(rounds):
        drawn = [rng.randrange(len(keys)) for _ in range(size)]
        winners.append(min(drawn, key=lambda i: order(keys[i], candidates[keys[i]])))
    return winners


def summarize(keys, candidates: dict) -> dict:
    """Best and median fitness of the population at each fidelity (finite values only)."""
    summary = {}
    for fidelity in ("proxy", "ppl"):
        values = [_value(candidates[k], fidelity) for k in keys]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        summary[f"best_{fidelity}"] = min(finite) if finite else None
        summary[f"median_{fidelity}"] = statistics.median(finite) if finite else None
    return summary
