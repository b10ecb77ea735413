"""Formula trees: immutable, hashable nodes shared by the parser, printer, SymPy bridge and compiler.

Invariant: a ``Const`` is >= 0 everywhere except as the exponent of ``pow``; a negative number is
``neg(Const)``, which is how ``-2`` reads in the text language.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    name: str


@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Call:
    op: str
    args: tuple


Expr = Term | Const | Call


def const(value: float) -> Expr:
    """A numeric literal respecting the invariant (negative values become neg(Const))."""
    value = float(value) + 0.0  # -0.0 -> 0.0
    return Call("neg", (Const(-value),)) if value < 0 else Const(value)


def operands(node: Call) -> tuple:
    """A pow's exponent literal is part of the operator, as in the GP's one-node pow1_3(x)."""
    return node.args[:1] if node.op == "pow" else node.args


def _nodes_with_depth(expr: Expr):
    """Every node with its depth (root = 1), iteratively so that deep trees cannot exhaust the stack."""
    stack = [(expr, 1)]
    while stack:
        node, level = stack.pop()
        yield node, level
        if isinstance(node, Call):
            stack.extend((a, level + 1) for a in operands(node))


def size(expr: Expr) -> int:
    return sum(1 for _ in _nodes_with_depth(expr))


def depth(expr: Expr) -> int:
    return max(level for _, level in _nodes_with_depth(expr))


def terminal_names(expr: Expr) -> set[str]:
    return {node.name for node, _ in _nodes_with_depth(expr) if isinstance(node, Term)}
