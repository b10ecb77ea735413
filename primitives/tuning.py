"""Local tuning of a formula's numeric constants: the formulas one constant step away.

A step moves a power's exponent (``x^c``, and ``abs``, ``sqrt``, ``sqr`` as |x|^1, |x|^(1/2), |x|^2) to a
neighbour in TUNING_EXPONENTS (exponent 1 is ``abs``), and any
other literal c to c / 2 or 2c. Steps that cannot change any mask of the comparison group (same
canonical key as the formula or as an earlier step) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from primitives.canonical import canonical_key
from primitives.grammar import parse_formula
from primitives.ops import POWER_EXPONENTS
from primitives.printer import format_formula
from primitives.tree import Call, Const, Expr, Term, operands

# The GP's exponents and 1 (no power), ascending.
TUNING_EXPONENTS: tuple[float, ...] = tuple(sorted({float(c) for c in POWER_EXPONENTS} | {1.0}))


def _is_power(expr: Expr) -> bool:
    return isinstance(expr, Call) and (expr.op == "pow" or expr.op in POWER_LIKE)


def _nodes(expr: Expr, path: tuple = (), in_power: bool = False) -> Iterator[tuple[tuple, Expr]]:
    """(path of argument indices, node) in pre-order; a pow's exponent belongs to the pow node, and a
    statistic right under a power is tuned through that power (not twice)."""
    if not (in_power and isinstance(expr, Term)):
        yield path, expr
    if isinstance(expr, Call):
        for index, arg in enumerate(operands(expr)):
            yield from _nodes(arg, (*path, index), _is_power(expr))


def _replace(expr: Expr, path: tuple, new: Expr) -> Expr:
    if not path:
        return new
    args = list(expr.args)
    args[path[0]] = _replace(args[path[0]], path[1:], new)
    return Call(expr.op, tuple(args))


def _power(base: Expr, exponent: float) -> Expr:
    return Call("abs", (base,)) if exponent == 1 else Call("pow", (base, Const(exponent)))


# Operators that are powers of |x| too: tuning moves sqrt(X) to X^(1/3) or X^(2/3), abs(W) to W^(2/3)...
POWER_LIKE = {"abs": 1.0, "sqrt": 0.5, "sqr": 2.0}
# Statistics that are never negative, so X is |X|^1 and X^(2/3), X^(3/2) are its steps (W is not: sign).
NONNEGATIVE_TERMINALS = frozenset({"X", "G", "H", "U"})


def _exponent_steps(node: Call) -> list[Expr]:
    """The power with its exponent moved one place down or up TUNING_EXPONENTS; none off the table."""
    exponent = POWER_LIKE[node.op] if node.op in POWER_LIKE else node.args[1].value
    if exponent not in TUNING_EXPONENTS:
        return []
    place = TUNING_EXPONENTS.index(exponent)
    neighbours = TUNING_EXPONENTS[max(place - 1, 0) : place] + TUNING_EXPONENTS[place + 1 : place + 2]
    return [_power(node.args[0], c) for c in neighbours]


def _steps(node: Expr) -> list[Expr]:
    """Replacements of ``node`` one constant step away, smaller value first."""
    if isinstance(node, Const):
        return [Const(c) for c in (node.value / 2, node.value * 2) if math.isfinite(c)]
    if _is_power(node):
        return _exponent_steps(node)
    if isinstance(node, Term) and node.name in NONNEGATIVE_TERMINALS:
        return _exponent_steps(Call("abs", (node,)))
    return []


def constant_neighbours(text: str, group: str = "row") -> list[str]:
    """Formula texts differing from ``text`` in one numeric constant, in tree pre-order (smaller value
    first), one per canonical key and never with the key of ``text``."""
    tree = parse_formula(text)
    seen = {canonical_key(tree, group)}
    neighbours = []
    for path, node in _nodes(tree):
        for step in _steps(node):
            candidate = _replace(tree, path, step)
            key = canonical_key(candidate, group)
            if key not in seen:
                seen.add(key)
                neighbours.append(format_formula(candidate))
    return neighbours
