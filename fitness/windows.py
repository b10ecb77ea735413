"""Which windows of the fitness corpus the search reads, and which it leaves for the final check.

Neighbouring windows of one article share its topic and style, so the per-window differences between
two pruned models are correlated (lag-1 autocorrelation up to ~0.5 on WikiText-2 valid): the first k
windows are worth fewer than k independent ones, and a formula can win on the few articles they hold
(see benchmarks/window_spread.py). ``spread`` takes windows evenly across the whole corpus, ordered so
that every prefix (a lower rung reads the first ``fitness_windows`` of the top rung's) is itself spread;
``first`` is the first windows in order, as runs before this setting read them.
"""

from __future__ import annotations

from pruning_core.errors import UsageError

WINDOW_ORDERS = ("spread", "first")


def spread_order(count: int) -> list[int]:
    """0..count-1 in bit-reversed (van der Corput) order: every prefix is spread over the range."""
    bits = max(count - 1, 0).bit_length()
    reversed_bits = (int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(1 << bits))
    return [i for i in reversed_bits if i < count]


def _evenly(pool: list[int], count: int) -> list[int]:
    """``count`` members of ``pool`` at evenly spaced positions (the middle of each of count slices)."""
    return [pool[(2 * j + 1) * len(pool) // (2 * count)] for j in range(count)]


def search_windows(total: int, count: int, order: str = "spread") -> list[int]:
    """Indices of the ``count`` windows the search reads out of ``total``, in the order the rungs read
    them (a rung with k windows reads the first k)."""
    if count > total:
        raise UsageError(
            f"the fitness corpus has {total} windows, fewer than the {count} the search reads; "
            "lower --top-windows or --fitness-seqlen"
        )
    if order == "first":
        return list(range(count))
    chosen = _evenly(list(range(total)), count)
    return [chosen[i] for i in spread_order(count)]


def held_out_windows(total: int, searched: list[int], count: int, order: str = "spread") -> list[int]:
    """Indices of up to ``count`` windows the search never read, for the final check: the ones right
    after the search's (``first``), or evenly spread over all the others (``spread``)."""
    rest = sorted(set(range(total)) - set(searched))
    if not rest:
        raise UsageError(
            f"the fitness corpus has {total} windows, all read by the search; lower --top-windows or "
            "--fitness-seqlen, or pass --final-top 0"
        )
    count = min(count, len(rest))
    return rest[:count] if order == "first" else _evenly(rest, count)
