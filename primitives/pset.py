"""The DEAP primitive set of the GP search, built from the operator table, and tree conversions.

Primitives are the table's operators except ``pow``, plus one unary primitive per power |x|^c that no
operator computes (``pow1_4``, ``pow1_3``, ``pow2_3``, ``pow3_2``, ``pow3``; sqrt and sqr are the powers
1/2 and 2). Terminals are the five statistics (DEAP arguments renamed W, X, G, H, U) and the fixed
constants 0.5, 1, 2, 3 as plain terminals (a fixed set needs no ephemeral generator, and plain
terminals pickle across worker processes).
"""

from __future__ import annotations

import math
from functools import partial

from deap import gp

from primitives.grammar import parse_formula
from primitives.kernels import k_pow
from primitives.ops import CONSTANTS, OPS, POWER_PRIMITIVES
from primitives.printer import format_formula
from primitives.terminals import TERMINALS
from primitives.tree import Call, Const, Expr, Term, const
from pruning_core.errors import UsageError

TERMINAL_ORDER = tuple(TERMINALS)


def make_pset(name: str = "formula") -> gp.PrimitiveSet:
    pset = gp.PrimitiveSet(name, len(TERMINAL_ORDER))
    pset.renameArguments(**{f"ARG{i}": term for i, term in enumerate(TERMINAL_ORDER)})
    for op in OPS.values():
        if op.in_pset:
            pset.addPrimitive(op.kernel, op.arity, name=op.name)
    for name, exponent in POWER_PRIMITIVES.items():
        pset.addPrimitive(partial(k_pow, exponent=float(exponent)), 1, name=name)
    for value in CONSTANTS:
        pset.addTerminal(value)
    return pset


# --- DEAP -> tree ------------------------------------------------------------------------------


def deap_to_tree(individual) -> Expr:
    """A DEAP prefix list (PrimitiveTree) as a formula tree."""
    nodes = list(individual)

    def build(index: int) -> tuple[Expr, int]:
        node = nodes[index]
        if isinstance(node, gp.Primitive):
            args, index = [], index + 1
            for _ in range(node.arity):
                child, index = build(index)
                args.append(child)
            if node.name in POWER_PRIMITIVES:
                return Call("pow", (args[0], Const(float(POWER_PRIMITIVES[node.name])))), index
            return Call(node.name, tuple(args)), index
        if isinstance(node.value, str) and node.value in TERMINALS:
            return Term(node.value), index + 1
        if isinstance(node.value, int | float) and math.isfinite(node.value):
            return const(node.value), index + 1
        raise ValueError(f"DEAP terminal {node.name!r} is neither a statistic nor a finite number")

    tree, end = build(0)
    if end != len(nodes):
        raise ValueError(f"DEAP tree has {len(nodes) - end} nodes after its root expression")
    return tree


def deap_to_text(individual) -> str:
    return format_formula(deap_to_tree(individual))


# --- tree -> DEAP ------------------------------------------------------------------------------


# Exponent value -> power primitive; a parsed ``x^0.3333333333333333`` holds exactly float(1/3).
_POWER_BY_VALUE: dict[float, str] = {float(c): name for name, c in POWER_PRIMITIVES.items()}


def _expand_pow(base: Expr, exponent: float) -> Expr:
    """|x|^c in GP terms: a pow node left for a power primitive, 1 / |x|^-c for c < 0, or for a
    multiple of 1/2 a product of sqr / abs / sqrt."""
    if exponent < 0:
        return Call("div", (Const(1.0), _expand_pow(base, -exponent)))
    if exponent in _POWER_BY_VALUE:
        return Call("pow", (base, Const(exponent)))
    if exponent * 2 != int(exponent * 2):
        powers = ", ".join(str(c) for c in POWER_PRIMITIVES.values())
        raise UsageError(
            f"x^{exponent} has no GP form (only multiples of 0.5 and the powers {powers}); "
            "rewrite it with sqr / sqrt"
        )
    if exponent == 0:
        return Const(1.0)
    whole, half = divmod(int(exponent * 2), 2)
    factors = [Call("sqr", (base,))] * (whole // 2)
    factors += [Call("abs", (base,))] if whole % 2 else []
    factors += [Call("sqrt", (base,))] if half else []
    node = factors[0]
    for factor in factors[1:]:
        node = Call("mul", (node, factor))
    return node


def _prefix(expr: Expr, pset: gp.PrimitiveSet, add_constants: bool, out: list) -> None:
    if isinstance(expr, Term):
        out.append(pset.mapping[expr.name])
    elif isinstance(expr, Const):
        name = repr(float(expr.value))
        if name not in pset.mapping:
            if not add_constants:
                raise UsageError(
                    f"constant {name} is not a GP terminal (have {', '.join(map(repr, CONSTANTS))}); "
                    "pass add_constants=True to add it"
                )
            pset.addTerminal(float(expr.value))
        out.append(pset.mapping[name])
    elif expr.op == "pow" and expr.args[1].value in _POWER_BY_VALUE:
        out.append(pset.mapping[_POWER_BY_VALUE[expr.args[1].value]])
        _prefix(expr.args[0], pset, add_constants, out)
    elif expr.op == "pow":
        _prefix(_expand_pow(expr.args[0], expr.args[1].value), pset, add_constants, out)
    else:
        out.append(pset.mapping[expr.op])
        for arg in expr.args:
            _prefix(arg, pset, add_constants, out)


def tree_to_deap(tree_or_text, pset: gp.PrimitiveSet, add_constants: bool = False) -> gp.PrimitiveTree:
    """A formula as a DEAP PrimitiveTree over ``pset``; ``x^c`` needs c (or -c) to be a multiple of 0.5 or
    a power primitive's exponent."""
    tree = parse_formula(tree_or_text) if isinstance(tree_or_text, str) else tree_or_text
    nodes: list = []
    _prefix(tree, pset, add_constants, nodes)
    return gp.PrimitiveTree(nodes)
