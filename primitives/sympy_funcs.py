"""SymPy heads for the operators that have no SymPy counterpart, with the exact identities they obey.

Every head is finite and real, as every protected operator is; quotients and logarithms of values
that may be zero go through ``inv`` / ``plog`` so that SymPy never produces an infinity.

Each ``eval`` applies only identities that hold for every real matrix (ideal, unprotected math):
matrix statistics ignore positive scaling, min-max and z-score also ignore shifts, and a row (column)
normalization of an already row (column) normalized matrix is the normalization of the original.
``lowfrac`` is a scalar: constant over the whole matrix.
"""

from __future__ import annotations

import sympy
from sympy import S


def is_scalar(expr: sympy.Expr) -> bool:
    """True when ``expr`` is the same value at every entry of the matrix (a number or a lowfrac)."""
    if expr.is_number or isinstance(expr, lowfrac):
        return True
    if expr.is_Symbol or not expr.args:
        return False
    return all(is_scalar(a) for a in expr.args)


def _leading_coefficient(expr: sympy.Add) -> sympy.Expr:
    """Coefficient of the leading term of a sum, the leading term being picked by the sort order of
    the terms without their coefficients, which neither a rescaling nor a negation changes."""
    pairs = [term.as_coeff_Mul() for term in expr.args]
    return min(pairs, key=lambda pair: sympy.default_sort_key(pair[1]))[0]


def minus_leads(expr: sympy.Expr) -> bool:
    """Exactly one of expr and -expr has a leading minus (for sums, by the leading term's sign)."""
    if expr.is_Add:
        return bool(_leading_coefficient(expr).is_negative)
    return expr.could_extract_minus_sign()


def unit_leading(expr: sympy.Expr) -> sympy.Expr:
    """A sum divided by |coefficient of its leading term| (2*W + 2*X -> W + X); idempotent."""
    if not expr.is_Add:
        return expr
    coefficient = _leading_coefficient(expr)
    if not coefficient.is_Rational or coefficient == 0 or abs(coefficient) == 1:
        return expr
    return expr / abs(coefficient)


def _drop_scalar_factors(expr: sympy.Expr) -> tuple[sympy.Expr, int]:
    """expr = s * rest with s a scalar of known sign: (rest, sign of s); else (expr, 1). A sum is
    rescaled to a leading coefficient of +1 (2*W - 4*X -> W - 2*X, X - W -> W - X with sign -1)."""
    if expr.is_Add:
        expr = unit_leading(expr)
        return (-expr, -1) if minus_leads(expr) else (expr, 1)
    if not expr.is_Mul:
        return expr, 1
    sign, rest = 1, []
    for factor in expr.args:
        if is_scalar(factor) and factor.is_positive:
            continue
        if is_scalar(factor) and factor.is_negative:
            sign = -sign
            continue
        rest.append(factor)
    if len(rest) == len(expr.args):
        return expr, 1
    return sympy.Mul(*rest), sign


def _drop_scalar_terms(expr: sympy.Expr) -> sympy.Expr:
    if not expr.is_Add:
        return expr
    rest = [t for t in expr.args if not is_scalar(t)]
    return sympy.Add(*rest) if len(rest) < len(expr.args) else expr


class _FiniteReal(sympy.Function):
    """One-argument head whose value is always a finite real, as every protected operator's is."""

    nargs = 1

    def _eval_is_extended_real(self):
        return True

    def _eval_is_finite(self):
        return True


class _ShiftScaleInvariant(_FiniteReal):
    """f(a*x + b) = f(x) for a > 0; f of a constant matrix is 0."""

    @classmethod
    def _negated(cls, inner):
        raise NotImplementedError

    @classmethod
    def eval(cls, x):
        if is_scalar(x):
            return S.Zero
        if isinstance(x, (mms, zsn)):
            return cls(x.args[0])
        shifted = _drop_scalar_terms(x)
        if shifted != x:
            return cls(shifted)
        rest, sign = _drop_scalar_factors(x)
        if rest != x:
            return cls(rest) if sign > 0 else cls._negated(rest)
        return None


class mms(_ShiftScaleInvariant):  # noqa: N801  (the operator's name in formulas)
    """Min-max scaling over the matrix, in [0, 1]; mms(-x) = 1 - mms(x)."""

    @classmethod
    def _negated(cls, inner):
        return 1 - cls(inner)

    def _eval_is_nonnegative(self):
        return True


class zsn(_ShiftScaleInvariant):  # noqa: N801
    """z-score over the matrix; zsn(-x) = -zsn(x)."""

    @classmethod
    def _negated(cls, inner):
        return -cls(inner)


COLUMN_SYMBOLS = {"X", "H"}  # terminals that are one value per input column


def _positive_per_column(expr: sympy.Expr) -> bool:
    """True when expr is one value per input column (or a scalar) that SymPy knows is > 0."""
    return bool(expr.is_extended_positive) and {s.name for s in expr.free_symbols} <= COLUMN_SYMBOLS


class _Normalization(_FiniteReal):
    """x divided by a positive per-row (per-column) norm of x: sign follows x, scale-invariant.
    An all-zero row / column stays zero (the protected kernels divide it by 1)."""

    family: tuple = ()
    per_column = False

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return S.Zero
        if isinstance(x, cls.family):
            return cls(x.args[0])
        if cls.per_column and x != 1 and {s.name for s in x.free_symbols} <= COLUMN_SYMBOLS:
            # A per-column value v normalizes to sign(v) / rows (sqrt(rows) for coll2) per column, and
            # an all-zero column stays 0: only a value that is nonzero everywhere folds to a constant
            # (mms(H) is >= 0 but exactly 0 in one column).
            if x.is_extended_positive:
                return cls(S.One)
            if x.is_extended_negative:
                return -cls(S.One)
        if cls.per_column and x.is_Mul:
            # Each column is scaled by one positive number, which its own norm divides out:
            # colnorm(x * c) = colnorm(x) for c > 0 per column. Only factors known to be strictly
            # positive go (mms(H) is 0 in a column, where the kernels leave the column at 0); a
            # positive factor so tiny or huge that the kernels floor or clamp it is the same accepted
            # protection edge as for a positive scalar.
            kept = [factor for factor in x.args if not _positive_per_column(factor)]
            if len(kept) < len(x.args):
                return cls(sympy.Mul(*kept))
        rest, sign = _drop_scalar_factors(x)
        if rest != x:
            return cls(rest) if sign > 0 else -cls(rest)
        return None

    def _eval_is_nonnegative(self):
        return self.args[0].is_nonnegative

    def _eval_is_nonpositive(self):
        return self.args[0].is_nonpositive


class rownorm(_Normalization):  # noqa: N801
    pass


class rowl2(_Normalization):  # noqa: N801
    pass


class colnorm(_Normalization):  # noqa: N801
    per_column = True


class coll2(_Normalization):  # noqa: N801
    per_column = True


rownorm.family = rowl2.family = (rownorm, rowl2)
colnorm.family = coll2.family = (colnorm, coll2)


class lowfrac(_FiniteReal):  # noqa: N801
    """Share of entries with |x| < 0.1 mean|x|: a scalar in [0, 1], unchanged by nonzero scaling."""

    @classmethod
    def eval(cls, x):
        if is_scalar(x):
            return S.Zero
        rest, _sign = _drop_scalar_factors(x)
        return cls(rest) if rest != x else None

    def _eval_is_nonnegative(self):
        return True


class sigmoid(_FiniteReal):  # noqa: N801
    """1 / (1 + e^-x), elementwise; kept as one head so the rank step can strip it."""

    def _eval_is_positive(self):
        return True


class inv(_FiniteReal):  # noqa: N801
    """1 / y for a y that may be zero (the protected div floors it): finite, nonzero, sign of y.

    Kept apart from y**-1 so SymPy never sees 1/0; the price is that y * inv(y) is not cancelled.
    """

    @classmethod
    def eval(cls, y):
        if y.is_zero is False:
            return 1 / y
        # No inv(inv(y)) -> y: with y = 0 the protected value is 1e-12, not 0.
        if minus_leads(y):
            return -cls(-y)
        if y.is_Mul:  # 1 / (a b) = inv(a) inv(b), so denominators are ordered like any product
            return sympy.Mul(*(cls(factor) for factor in y.args))
        coefficient, rest = y.as_coeff_Mul()
        if coefficient != 1 and coefficient.is_zero is False:
            return cls(rest) / coefficient
        return None

    def _eval_power(self, exponent):
        # inv(y)**k = inv(y**k) for k > 0; never inv(y)**-1 -> y, which is wrong at y = 0.
        base = self.args[0]
        if exponent.is_positive and (exponent.is_integer or base.is_extended_nonnegative):
            return inv(base**exponent)
        return None

    def _eval_is_zero(self):
        return False

    def _eval_is_extended_positive(self):
        return self.args[0].is_extended_nonnegative

    def _eval_is_extended_negative(self):
        return self.args[0].is_extended_negative


class plog(_FiniteReal):  # noqa: N801
    """log|x|, which is log(Abs(x)) once x is known nonzero; for an x that may be zero (the protected
    log adds 1e-12) it stays this finite head."""

    @classmethod
    def eval(cls, x):
        if x.is_zero is False:
            return sympy.log(sympy.Abs(x))
        if isinstance(x, sympy.Abs):
            return cls(x.args[0])
        if minus_leads(x):
            return cls(-x)
        return None


def divide(x: sympy.Expr, y: sympy.Expr) -> sympy.Expr:
    return x * inv(y)


def power_abs(x: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    """|x|^c; a negative power goes through inv (x may be zero)."""
    if exponent.is_negative:
        return inv(sympy.Abs(x) ** -exponent)
    return sympy.Abs(x) ** exponent
