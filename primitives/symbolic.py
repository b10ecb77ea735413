"""Formula tree <-> SymPy expression, and folding of terminal-free subtrees.

Constant subtrees other than rational arithmetic are folded with the protected float32 kernels before
SymPy sees the tree, so SymPy never builds huge exact numbers (``3^1e9``) and constants keep their
protected meaning. Going back,
every SymPy node must map onto an operator with the same meaning; anything else raises
``Unrepresentable`` and the caller keeps the tree unsimplified.
"""

from __future__ import annotations

from fractions import Fraction

import sympy
import torch
from sympy import S

from primitives.kernels import BIG
from primitives.ops import OPS, SYMPY_HEADS
from primitives.printer import format_formula
from primitives.sympy_funcs import inv
from primitives.terminals import SYMPY_TERMINALS
from primitives.tree import Call, Const, Expr, Term, const

_SMALL_RATIO = 10**6  # p / q printed as a division only when both are below this


class Unrepresentable(Exception):
    """A SymPy expression with no operator-for-operator counterpart in the formula language."""


# --- constant folding --------------------------------------------------------------------------


def constant_value(expr: Expr) -> float | None:
    """The number a tree stands for when it is a literal (Const or neg(Const)), else None."""
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Call) and expr.op == "neg" and isinstance(expr.args[0], Const):
        return -expr.args[0].value
    return None


def _evaluate(op_name: str, values: list[float]) -> float | None:
    op = OPS[op_name]
    if op_name == "pow":
        return float(op.kernel(torch.tensor(values[0], dtype=torch.float32), values[1]))
    if op.matrix_wide:
        if not op.shape_free_constant:
            return None  # e.g. rownorm(c) = sign(c) / columns depends on the layer's shape
        matrix = torch.full((2, 2), values[0], dtype=torch.float32)
        return float(op.kernel(matrix).reshape(-1)[0])
    return float(op.kernel(*(torch.tensor(v, dtype=torch.float32) for v in values)))


_EXACT = {"add", "sub", "mul", "div", "neg"}  # SymPy does these exactly on rationals; no size blow-up


def fold_constants(expr: Expr, keep_rational: bool = True) -> Expr:
    """Replace terminal-free subtrees by their protected float32 values. With ``keep_rational``,
    rational arithmetic stays for SymPy to do exactly (1 / 6 stays 1 / 6; 1 / 0 becomes inv(0))."""
    if not isinstance(expr, Call):
        return expr
    args = tuple(fold_constants(a, keep_rational) for a in expr.args)
    if expr.op == "pow":
        args = (args[0], expr.args[1])  # the exponent is a literal, possibly negative
    values = [constant_value(a) for a in args]
    exact = keep_rational and expr.op in _EXACT
    if not exact and expr.op != "neg" and all(v is not None for v in values):
        folded = _evaluate(expr.op, values)
        if folded is not None:
            return const(folded)
    return Call(expr.op, args)


# --- tree -> SymPy -----------------------------------------------------------------------------


def _rational(value: float) -> sympy.Rational:
    exact = Fraction(value)
    return sympy.Rational(exact.numerator, exact.denominator)


_EXPONENT_DENOMINATOR = 1000  # 1/3, 2/3, and ratios of them such as 7/18 from the rank step


def _exponent(value: float) -> sympy.Rational:
    """A pow literal as SymPy's exponent: the short fraction whose nearest float it is (0.333... is 1/3,
    so that (x^(1/3))^3 is x), else the float's exact value."""
    short = Fraction(value).limit_denominator(_EXPONENT_DENOMINATOR)
    exact = short if float(short) == value else Fraction(value)
    return sympy.Rational(exact.numerator, exact.denominator)


_SINGULAR = (S.NaN, S.ComplexInfinity, S.Infinity, S.NegativeInfinity, S.ImaginaryUnit)
OPAQUE_PREFIX = "opaque:"


def to_sympy(expr: Expr, opaque: dict[str, Expr], memo: dict | None = None) -> sympy.Expr:
    """The ideal (unprotected) meaning of a tree as a SymPy expression.

    A subtree that is singular in ideal math (``W / (X - X)`` is complex infinity) keeps its protected
    meaning: it becomes an opaque real symbol, recorded in ``opaque`` by name for ``from_sympy``.
    """
    memo = {} if memo is None else memo
    if expr in memo:
        return memo[expr]
    if isinstance(expr, Term):
        result = SYMPY_TERMINALS[expr.name]
    elif isinstance(expr, Const):
        result = _rational(expr.value)
    elif expr.op == "pow":
        result = OPS["pow"].to_sympy(to_sympy(expr.args[0], opaque, memo), _exponent(expr.args[1].value))
    else:
        result = OPS[expr.op].to_sympy(*(to_sympy(a, opaque, memo) for a in expr.args))
    if result.has(*_SINGULAR):
        name = OPAQUE_PREFIX + format_formula(expr)
        opaque[name] = expr
        result = sympy.Symbol(name, real=True)
    memo[expr] = result
    return result


def reevaluate(expr: sympy.Expr, rounds: int = 3) -> sympy.Expr:
    """Rebuild bottom-up with evaluation until stable: SymPy leaves some nodes unevaluated, e.g.
    Abs(Abs(W) / H) becomes Abs(Abs(W)) / H."""
    for _ in range(rounds):
        rebuilt = _rebuild(expr)
        if rebuilt == expr:
            break
        expr = rebuilt
    return expr


def _rebuild(expr: sympy.Expr) -> sympy.Expr:
    return expr.func(*(_rebuild(a) for a in expr.args)) if expr.args else expr


# --- SymPy -> tree -----------------------------------------------------------------------------


def _number(value: sympy.Rational) -> Expr:
    """A rational as a literal, or as p / q when no float holds it exactly but p and q are small."""
    p, q = int(value.p), int(value.q)
    if abs(Fraction(p, q)) > BIG:
        return const(BIG if p > 0 else -BIG)
    approx = float(Fraction(p, q))
    if Fraction(approx) == Fraction(p, q) or abs(p) >= _SMALL_RATIO or q >= _SMALL_RATIO:
        return const(approx)
    quotient = Call("div", (Const(float(abs(p))), Const(float(q))))
    return Call("neg", (quotient,)) if p < 0 else quotient


def _chain(op: str, items: list[Expr]) -> Expr:
    node = items[0]
    for item in items[1:]:
        node = Call(op, (node, item))
    return node


def _base_exponent(factor: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    if factor.is_Pow and factor.exp.is_Rational:
        return factor.base, factor.exp
    return factor, S.One


def _merge_magnitudes(factors) -> list[tuple[sympy.Expr, sympy.Expr]]:
    """(base, exponent) per factor, with x**2 * Abs(x) (SymPy's form of |x|^3) merged back into
    Abs(x)**3; unevaluated, since SymPy would split it again."""
    pairs = [_base_exponent(f) for f in factors]
    magnitudes = {base.args[0] for base, _ in pairs if isinstance(base, sympy.Abs)}
    merged: dict[sympy.Expr, sympy.Expr] = {}
    kept = []
    for base, exponent in pairs:
        inner = base.args[0] if isinstance(base, sympy.Abs) else base
        if inner in magnitudes and (
            isinstance(base, sympy.Abs) or (exponent.is_integer and exponent.is_even)
        ):
            merged[inner] = merged.get(inner, S.Zero) + exponent
        else:
            kept.append((base, exponent))
    kept += [(sympy.Abs(inner, evaluate=False), total) for inner, total in merged.items() if total != 0]
    return kept


class _TreeBuilder:
    """SymPy -> tree, operator for operator; opaque symbols map back to the subtrees they stand for."""

    def __init__(self, opaque: dict[str, Expr]):
        self.opaque = opaque

    def build(self, expr: sympy.Expr) -> Expr:
        if expr.is_Symbol:
            if expr.name in SYMPY_TERMINALS:
                return Term(expr.name)
            if expr.name in self.opaque:
                return self.opaque[expr.name]
            raise Unrepresentable(f"unknown symbol {expr.name}")
        if expr.is_Rational:
            return _number(expr)
        if expr is S.Exp1:
            return Call("exp", (Const(1.0),))
        if expr.is_Add:
            return self.sum(expr)
        if expr.is_Mul:
            return self.product(expr)
        if expr.is_Pow:
            base, exponent = expr.base, expr.exp
            if not exponent.is_Rational:
                raise Unrepresentable(f"non-numeric exponent in {expr}")
            if exponent.is_negative:
                return Call("div", (Const(1.0), self.power(base, -exponent)))
            return self.power(base, exponent)
        if isinstance(expr, inv):
            return Call("div", (Const(1.0), self.build(expr.args[0])))
        if isinstance(expr, sympy.log):
            arg = expr.args[0]
            if isinstance(arg, sympy.Abs):
                return Call("log", (self.build(arg.args[0]),))
            if arg.is_nonnegative:
                return Call("log", (self.build(arg),))
            raise Unrepresentable(f"log of a possibly negative value: {expr}")
        if expr.func in SYMPY_HEADS:
            return Call(SYMPY_HEADS[expr.func], tuple(self.build(a) for a in expr.args))
        raise Unrepresentable(f"no operator for {expr.func.__name__}")

    def sum(self, expr: sympy.Add) -> Expr:
        positive = [t for t in expr.args if not t.could_extract_minus_sign()]
        negative = [-t for t in expr.args if t.could_extract_minus_sign()]
        if positive:
            node = _chain("add", [self.build(t) for t in positive])
        else:
            node, negative = Call("neg", (self.build(negative[0]),)), negative[1:]
        for term in negative:
            node = Call("sub", (node, self.build(term)))
        return node

    def power(self, base: sympy.Expr, exponent: sympy.Rational) -> Expr:
        """base**exponent for a rational exponent > 0, using |.|-based operators only where they agree."""
        if exponent == 1:
            return self.build(base)
        if base.is_nonnegative or isinstance(base, sympy.Abs):
            inner = self.build(base.args[0] if isinstance(base, sympy.Abs) else base)
            if exponent == 2:
                return Call("sqr", (inner,))
            if exponent == S.Half:
                return Call("sqrt", (inner,))
            return Call("pow", (inner, Const(float(exponent))))
        if base.is_extended_real and exponent.is_integer:
            if exponent.is_even:
                inner = self.build(base)
                return (
                    Call("sqr", (inner,)) if exponent == 2 else Call("pow", (inner, Const(float(exponent))))
                )
            return Call("mul", (self.power(base, exponent - 1), self.build(base)))
        raise Unrepresentable(f"{base}**{exponent}")

    def product(self, expr: sympy.Expr) -> Expr:
        coefficient, factors = expr.as_coeff_mul()
        if not coefficient.is_Rational:
            raise Unrepresentable(f"coefficient {coefficient}")
        numerator, denominator = [], []
        magnitude = abs(coefficient)
        if magnitude != 1:
            if magnitude.q == 1 or magnitude.q >= _SMALL_RATIO or magnitude.p >= _SMALL_RATIO:
                numerator.append(_number(magnitude))
            else:
                numerator += [Const(float(magnitude.p))] if magnitude.p != 1 else []
                denominator.append(Const(float(magnitude.q)))
        for base, exponent in _merge_magnitudes(factors):
            if isinstance(base, inv):
                base, exponent = base.args[0], -exponent
            if exponent.is_negative:
                denominator.append(self.power(base, -exponent))
            else:
                numerator.append(self.power(base, exponent))
        node = _chain("mul", numerator) if numerator else Const(1.0)
        if denominator:
            node = Call("div", (node, _chain("mul", denominator)))
        return Call("neg", (node,)) if coefficient.is_negative else node


def from_sympy(expr: sympy.Expr, opaque: dict[str, Expr] | None = None) -> Expr:
    """A tree with the same ideal meaning as ``expr``; raises Unrepresentable otherwise."""
    return _TreeBuilder(opaque or {}).build(expr)


def number_value(number: sympy.Expr) -> float | None:
    """The protected float32 value of a SymPy number (sqrt(2), exp(exp(40))), without asking SymPy to
    evaluate it: its evalf can run for minutes on towers of exponentials. None if not evaluable."""
    try:
        return constant_value(fold_constants(from_sympy(number), keep_rational=False))
    except Unrepresentable:
        return None
