"""Canonical forms: fold constants, simplify with SymPy's automatic evaluation, drop what cannot change
any mask (``primitives.rank``), print. Two trees with the same key are compiled from the same
canonical tree, so they give identical scores and masks by construction.

The semantics of a formula is the protected evaluation of its canonical form. SymPy reasons with
ideal math (``x / x = 1``, ``log(exp(x)) = x``); the two differ only where protection kicks in
(|y| < 1e-12 in a denominator, exp beyond its clamp, values beyond 1e30).

Only SymPy's automatic evaluation runs (no ``simplify``), and trees above MAX_SYMBOLIC_NODES skip
SymPy, so one tree costs milliseconds. A subtree that is singular in ideal math (``W / (X - X)``) is
kept as an opaque symbol with its protected meaning; whatever SymPy cannot express back in the
language falls back to the constant-folded tree itself.
"""

from __future__ import annotations

from functools import lru_cache

from sympy import S

from primitives.grammar import parse_formula
from primitives.printer import format_formula
from primitives.rank import rank_canonical
from primitives.symbolic import Unrepresentable, fold_constants, from_sympy, reevaluate, to_sympy
from primitives.tree import Expr, size
from pruning_core.spec import check_group

MAX_SYMBOLIC_NODES = 255
_INVALID = (S.NaN, S.ComplexInfinity, S.Infinity, S.NegativeInfinity, S.ImaginaryUnit)


def _as_tree(tree_or_text) -> Expr:
    return parse_formula(tree_or_text) if isinstance(tree_or_text, str) else tree_or_text


def _symbolic(folded: Expr, group: str) -> Expr | None:
    opaque: dict[str, Expr] = {}
    try:
        expr = rank_canonical(reevaluate(to_sympy(folded, opaque)), group)
        if expr.has(*_INVALID):
            return None
        return from_sympy(expr, opaque)
    except Unrepresentable:
        return None
    except Exception:  # noqa: BLE001  any SymPy failure: the unsimplified tree is still a sound key
        return None


@lru_cache(maxsize=1 << 14)
def _canonical(tree: Expr, group: str) -> tuple[str, Expr]:
    folded = fold_constants(tree)
    canonical = _symbolic(folded, group) if size(folded) <= MAX_SYMBOLIC_NODES else None
    canonical = folded if canonical is None else canonical
    return format_formula(canonical), canonical


def canonical_form(tree_or_text, group: str = "row") -> tuple[str, Expr]:
    """(key, canonical tree) of a formula for a comparison group ("row" covers N:M too)."""
    return _canonical(_as_tree(tree_or_text), check_group(group))


def canonical_key(tree_or_text, group: str = "row") -> str:
    """Printed canonical form: equal keys mean identical masks for that group."""
    return canonical_form(tree_or_text, group)[0]
