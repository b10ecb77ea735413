"""Constant tuning: the formulas one numeric-constant step away, against hand-written lists."""

from __future__ import annotations

import pytest

from primitives import canonical_key
from primitives.tuning import TUNING_EXPONENTS, constant_neighbours

THIRD, TWO_THIRDS = "0.3333333333333333", "0.6666666666666666"


def test_tuning_exponents_are_the_gp_exponents_and_one():
    assert TUNING_EXPONENTS == (1 / 4, 1 / 3, 1 / 2, 2 / 3, 1.0, 3 / 2, 2.0, 3.0)


@pytest.mark.parametrize(
    "text, want",
    [
        # abs is |W|^1, sqrt |x|^(1/2), a bare X |X|^1; W itself has a sign, so no power of it
        # X * W^(2/3) ranks like X^(3/2) * abs(W) (both to the power 3/2): one key, the first one found
        ("X * abs(W)", [f"X^{TWO_THIRDS} * abs(W)", "X^1.5 * abs(W)"]),
        ("sqrt(X) * W", [f"X^{THIRD} * W", f"X^{TWO_THIRDS} * W"]),
        (
            "abs(W) * X^0.5",
            [f"W^{TWO_THIRDS} * X^0.5", "W^1.5 * X^0.5", f"abs(W) * X^{TWO_THIRDS}"],  # X^(1/3) ~ W^1.5
        ),
        # pre-order: the literal 0.5 before the pow; 3 is the largest exponent, so only 2
        (
            "abs(W) + 0.5 * X^3",
            [
                f"W^{TWO_THIRDS} + 0.5 * X^3",
                "W^1.5 + 0.5 * X^3",
                "abs(W) + 0.25 * X^3",
                "abs(W) + 1 * X^3",
                "abs(W) + 0.5 * X^2",
            ],
        ),  # fmt: skip
        # exponent 1 is abs (|x|^1); exponents off the table (2.5, -0.5) have no steps
        (f"W * X^{TWO_THIRDS} + W^2.5", ["W * X^0.5 + W^2.5", "W * abs(X) + W^2.5"]),
        # the literal 2 only rescales the row: both its steps have the formula's own key
        (
            "2 * abs(W) * X^0.25",
            [f"2 * W^{TWO_THIRDS} * X^0.25", "2 * W^1.5 * X^0.25", f"2 * abs(W) * X^{THIRD}"],
        ),
        # the second term's steps repeat the first term's keys
        ("W * X^0.5 + W * X^0.5", [f"W * X^{THIRD} + W * X^0.5", f"W * X^{TWO_THIRDS} + W * X^0.5"]),
        ("W * 2 + 4", []),
        ("W^-0.5", []),
    ],
)
def test_constant_neighbours(text, want):
    assert constant_neighbours(text) == want


def test_neighbours_have_distinct_keys_other_than_the_formulas():
    for group in ("row", "matrix"):
        text = "(0.7 * (1 - 0.3 * lowfrac(W)) * zsn(rowl2(W))^3 + 0.5 * zsn(coll2(W))^3) * X^1.5"
        keys = [canonical_key(t, group) for t in constant_neighbours(text, group)]
        assert len(keys) == len(set(keys)) and canonical_key(text, group) not in keys
        assert keys
