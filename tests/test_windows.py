"""Which fitness windows the rungs read and which the final check keeps (fitness.windows)."""

import pytest

from fitness.windows import held_out_windows, search_windows, spread_order
from pruning_core.errors import UsageError


def test_spread_order_visits_halves_then_quarters_then_eighths():
    assert spread_order(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert spread_order(16)[:4] == [0, 8, 4, 12]
    assert spread_order(6) == [0, 4, 2, 1, 5, 3]  # 8's order without 6 and 7
    assert spread_order(1) == [0] and spread_order(0) == []
    for n in range(1, 40):
        assert sorted(spread_order(n)) == list(range(n))


def test_spread_search_windows_are_the_middles_of_equal_slices_and_every_prefix_spans_the_corpus():
    # 480 windows, 8 read: slices of 60, middles 30, 90, ..., 450, visited halves first
    assert search_windows(480, 8) == [30, 270, 150, 390, 90, 330, 210, 450]
    chosen = search_windows(523, 16)
    assert len(set(chosen)) == 16 and all(0 <= i < 523 for i in chosen)
    gaps = [b - a for a, b in zip(sorted(chosen), sorted(chosen)[1:])]
    assert max(gaps) - min(gaps) <= 1
    for k in (2, 4, 8):  # a rung with k windows reads one in each k-th of the corpus
        assert sorted(i * k // 523 for i in chosen[:k]) == list(range(k))


def test_first_order_reads_the_first_windows_and_holds_out_the_next():
    assert search_windows(100, 5, "first") == [0, 1, 2, 3, 4]
    assert held_out_windows(100, [0, 1, 2, 3, 4], 3, "first") == [5, 6, 7]
    assert held_out_windows(7, [0, 1, 2, 3, 4], 3, "first") == [5, 6]  # what is left


def test_held_out_windows_are_never_searched_and_spread_over_the_rest():
    searched = search_windows(480, 8)
    held = held_out_windows(480, searched, 16)
    assert not set(held) & set(searched) and len(set(held)) == 16
    rest = [i for i in range(480) if i not in searched]  # 472 windows: one per slice of 29.5
    assert held == [rest[(2 * j + 1) * 472 // 32] for j in range(16)]
    assert held[0] < 30 and held[-1] > 450


def test_too_few_windows_is_one_line_naming_the_flags():
    with pytest.raises(UsageError, match="--top-windows"):
        search_windows(5, 8)
    with pytest.raises(UsageError, match="--final-top 0"):
        held_out_windows(4, [0, 1, 2, 3], 2)
