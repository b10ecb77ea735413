"""Rank-equivalence canonicalization of SymPy score expressions.

A mask only depends on the order of scores inside each comparison group (one row for the ``row``
group and N:M, the whole matrix for ``matrix``), so from the outside in we drop:
- strictly increasing maps: exp, tanh, sigmoid, mms, zsn, log of a non-negative value, positive powers
  of a non-negative value, odd integer powers; a decreasing map (negative power or inverse of a
  non-negative value, negation) is dropped and the final score negated;
- terms that are the same at every entry (numbers, lowfrac) and factors of known sign that are,
  including the positive rational common to all terms of a sum;
- under ``row``: factors rownorm(x) / rowl2(x) become x (they differ by a positive per-row factor);
- for a product P of non-negative factors: P and -1/P order alike, so P is inverted (and the score
  negated) when log P, a sum, has a leading minus (``minus_leads``); then P is raised to a positive power that
  divides every exponent by the largest |exponent| (roots, never higher powers, so the canonical form
  cannot overflow or underflow where the original does not).
- a product with exp factors becomes its logarithm (e^a * b -> a + log b) and a sum of logarithms its
  exponential (log a + log b -> a * b): SymPy writes exp(a + log b) as e^a * b, so each has to have
  one canonical form, and these are the ones that cannot overflow where the original did not.
Folding of opposing pairs (log∘exp, sqrt∘sqr, neg∘neg, abs∘abs) is SymPy's own automatic evaluation.
"""

from __future__ import annotations

import sympy
from sympy import S

from primitives.ops import INCREASING_HEADS
from primitives.symbolic import number_value
from primitives.sympy_funcs import inv, is_scalar, minus_leads, plog, rowl2, rownorm, unit_leading

_MAX_STEPS = 64


def _base_exponent(factor: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    if factor.is_Pow:
        return factor.base, factor.exp
    return factor, S.One


def _peel_power(expr: sympy.Pow) -> tuple[sympy.Expr, bool]:
    base, exponent = expr.base, expr.exp
    if not exponent.is_Rational:
        return expr, False
    if base.is_nonnegative:
        return base, exponent.is_negative
    if base.is_extended_real and exponent.is_integer:
        if exponent.is_even:
            return sympy.Abs(base), exponent.is_negative
        if exponent.is_positive:
            return base, False
    return expr, False


def _nonnegative_parts(factors) -> list[tuple[sympy.Expr, sympy.Rational]] | None:
    """The product as (non-negative base, total rational exponent) pairs, one per distinct base
    (x**2 * |x| is |x|**3), or None if some factor may be negative."""
    parts: dict[sympy.Expr, sympy.Rational] = {}
    for factor in factors:
        base, exponent = _base_exponent(factor)
        if not exponent.is_Rational:
            return None
        if isinstance(base, inv):
            base, exponent = base.args[0], -exponent
        while base.is_Pow and base.exp.is_Rational:  # one spelling per factor: (y**2)**-1 -> |y|**-2
            inner, power = base.base, base.exp
            if not (inner.is_nonnegative or (inner.is_extended_real and power.is_integer and power.is_even)):
                break
            base, exponent = (inner if inner.is_nonnegative else sympy.Abs(inner)), exponent * power
        if not base.is_nonnegative:
            if not (base.is_extended_real and exponent.is_integer and exponent.is_even):
                return None
            base = sympy.Abs(base)
        parts[base] = parts.get(base, S.Zero) + exponent
    return [(base, exponent) for base, exponent in parts.items() if exponent != 0]


def _peel_product(expr: sympy.Mul, group: str) -> tuple[sympy.Expr, bool]:
    kept, flip, changed = [], False, False
    for factor in expr.args:
        if is_scalar(factor) and (factor.is_positive or factor.is_negative):
            flip ^= bool(factor.is_negative)
            changed = True
            continue
        base, exponent = _base_exponent(factor)
        if group == "row" and isinstance(base, (rownorm, rowl2)):
            factor, changed = base.args[0] ** exponent, True
        elif isinstance(base, sympy.exp) and base.args[0].is_Add and any(map(is_scalar, base.args[0].args)):
            # exp(a + s) = e^s exp(a): a positive scalar factor SymPy keeps inside the exp
            varying = [t for t in base.args[0].args if not is_scalar(t)]
            factor, changed = sympy.exp(sympy.Add(*varying)) ** exponent, True
        kept.append(factor)
    if changed:
        return sympy.Mul(*kept), flip
    parts = _nonnegative_parts(expr.args)
    if parts is None:
        return expr, False
    log_product = sympy.Add(*(exponent * _log(base) for base, exponent in parts))
    if any(isinstance(base, sympy.exp) for base, _ in parts):
        # log P, a sum: SymPy turns exp(a + log b) into e^a * b, and the sum is the form that cannot
        # overflow where the original did not.
        return log_product, False
    # P and -1/P order alike: orient by the leading sign of log P.
    if minus_leads(log_product):
        return sympy.Mul(*(_power(base, -exponent) for base, exponent in parts)), True
    largest = max((abs(exponent) for _, exponent in parts), default=S.One)
    if largest != 1 or len(parts) < len(expr.args):
        return sympy.Mul(*(_power(base, exponent / largest) for base, exponent in parts)), False
    return expr, False


def _log(base: sympy.Expr) -> sympy.Expr:
    return base.args[0] if isinstance(base, sympy.exp) else sympy.log(base)


def _power(base: sympy.Expr, exponent: sympy.Rational) -> sympy.Expr:
    """base**exponent, through inv for a negative power of a base that may be zero."""
    if exponent.is_negative and base.is_zero is not False:
        return inv(base**-exponent)
    return base**exponent


def _is_log_term(term: sympy.Expr) -> bool:
    coefficient, rest = term.as_coeff_Mul()
    return coefficient.is_Rational and isinstance(rest, sympy.log)


def _exponentiate_logs(expr: sympy.Add) -> sympy.Expr:
    """A sum of logarithms c*log(b) becomes the product of powers b^c (the form products take);
    any other sum gets its leading coefficient scaled to +-1."""
    if all(_is_log_term(term) for term in expr.args):
        return sympy.exp(expr)
    return unit_leading(expr)


def _peel(expr: sympy.Expr, group: str) -> tuple[sympy.Expr, bool]:
    """One outermost rank-preserving (or, flagged, rank-reversing) step; (expr, False) when none."""
    if expr.is_Add:
        kept = [t for t in expr.args if not is_scalar(t)]
        if len(kept) < len(expr.args):
            return sympy.Add(*kept), False
        return _exponentiate_logs(expr), False
    if expr.is_Mul:
        return _peel_product(expr, group)
    if expr.is_Pow:
        return _peel_power(expr)
    if isinstance(expr, INCREASING_HEADS):
        return expr.args[0], False
    if isinstance(expr, sympy.log) and expr.args[0].is_extended_nonnegative:
        return expr.args[0], False
    if isinstance(expr, plog):  # log|x| orders like |x|
        return sympy.Abs(expr.args[0]), False
    if isinstance(expr, inv) and expr.args[0].is_extended_nonnegative:
        return expr.args[0], True
    if group == "row" and isinstance(expr, (rownorm, rowl2)):
        return expr.args[0], False
    return expr, False


def _rational_number(number: sympy.Expr) -> sympy.Expr:
    value = number_value(number)
    return number if value is None else sympy.Rational(value)  # None: e.g. rownorm(2), shape-dependent


def _tidy(expr: sympy.Expr) -> sympy.Expr:
    """One spelling per expression: irrational numbers (sqrt(2), e^2) become the rationals of their
    protected float32 values, as they would after printing and parsing again; |x| of a non-negative x
    is x; a sum inside a product is written with a leading plus (``minus_leads``), the product taking
    the sign."""
    if expr.is_number and not expr.is_Rational:
        return _rational_number(expr)
    if not expr.args:
        return expr
    expr = expr.func(*(_tidy(a) for a in expr.args))
    if isinstance(expr, sympy.Abs) and expr.args[0].is_extended_nonnegative:
        return expr.args[0]  # SymPy leaves some, e.g. Abs(1 / Abs(W))
    if not expr.is_Mul:
        return expr
    factors, negate = [], False
    for factor in expr.args:
        base, exponent = _base_exponent(factor)
        if base.is_Add and exponent.is_integer and minus_leads(base):
            factor = (-base) ** exponent
            negate ^= bool(exponent.is_odd)
        factors.append(factor)
    product = sympy.Mul(*factors)
    return -product if negate else product


def rank_canonical(expr: sympy.Expr, group: str) -> sympy.Expr:
    """An expression ordering every comparison group of ``group`` exactly as ``expr`` does."""
    negate = False
    for _ in range(_MAX_STEPS):
        expr = _tidy(expr)
        if is_scalar(expr):
            return S.Zero  # one value everywhere: every mask is the stable tie-break
        peeled, flip = _peel(expr, group)
        negate ^= flip
        if peeled == expr:
            break
        expr = peeled
    return _tidy(-expr if negate else expr)
