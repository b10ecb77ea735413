"""Formula tree -> text, with the fewest parentheses that parse back to the same tree."""

from __future__ import annotations

import math

from primitives.ops import OPS
from primitives.tree import Const, Expr, Term

_ATOM = 5


def format_number(value: float) -> str:
    """Shortest text that parses back to exactly ``value`` (integers without a fraction)."""
    if not math.isfinite(value):
        raise ValueError(f"formula constants must be finite, got {value}")
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _format(expr: Expr) -> tuple[str, int]:
    """(text, precedence of its outermost operator)."""
    if isinstance(expr, Term):
        return expr.name, _ATOM
    if isinstance(expr, Const):
        text = format_number(expr.value)
        return (text, _ATOM) if expr.value >= 0 else (f"({text})", _ATOM)
    op = OPS[expr.op]
    parts = [_format(a) for a in expr.args]
    if op.syntax == "call":
        return f"{op.name}({', '.join(p[0] for p in parts)})", _ATOM
    if op.syntax == "prefix":
        text, prec = parts[0]
        # "-(-x)" rather than "--x": same tree, easier to read.
        return f"-{_wrap(text, prec <= op.precedence)}", op.precedence
    if op.syntax == "power":
        (base, prec), exponent = parts[0], expr.args[1]
        return f"{_wrap(base, prec < _ATOM)}^{format_number(exponent.value)}", op.precedence
    (left, lprec), (right, rprec) = parts
    # Left-associative: the left operand may share the precedence, the right one may not.
    return (
        f"{_wrap(left, lprec < op.precedence)} {op.symbol} {_wrap(right, rprec <= op.precedence)}",
        op.precedence,
    )


def _wrap(text: str, needed: bool) -> str:
    return f"({text})" if needed else text


def format_formula(expr: Expr) -> str:
    return _format(expr)[0]
