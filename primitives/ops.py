"""The one table of formula operators: name, arity, torch kernel, SymPy form, printed form, rank facts.

Everything else (parser, printer, SymPy conversion, compiler, DEAP primitive set) reads this table.
Semantics are the protected kernels of ``primitives.kernels``. ``div`` is elementwise
(x / y with y's magnitude floored at EPS); Pruner-Zero's div instead divided by the scalar norm of y.
``pow`` is written ``x^c`` with a numeric literal c and means |x|^c; the GP gets it as one unary
primitive per exponent of POWER_EXPONENTS that no other operator computes (``pow1_3`` is |x|^(1/3)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import sympy

from primitives import kernels as k
from primitives import sympy_funcs as sf


@dataclass(frozen=True)
class Op:
    name: str
    arity: int
    kernel: Callable
    to_sympy: Callable  # SymPy args -> SymPy expression with the same ideal (unprotected) meaning
    doc: str
    syntax: str = "call"  # "call": name(args); "infix": a op b; "prefix": -a; "power": a^c
    symbol: str = ""
    precedence: int = 5  # binding strength in printed text; calls and atoms are 5
    sympy_head: type | None = None  # SymPy class that maps straight back to this op
    increasing: bool = False  # strictly increasing map: dropped at the outside by rank canonicalization
    matrix_wide: bool = False  # reads the whole (out x in) matrix, not one entry
    shape_free_constant: bool = True  # its value on a constant matrix does not depend on the shape
    in_pset: bool = True  # part of the GP primitive set


_OPS = [
    Op("abs", 1, k.k_abs, sympy.Abs, "|x|", sympy_head=sympy.Abs),
    Op("neg", 1, k.k_neg, lambda x: -x, "-x", syntax="prefix", symbol="-", precedence=3),
    Op("sqr", 1, k.k_sqr, lambda x: x**2, "x^2"),
    Op("sqrt", 1, k.k_sqrt, lambda x: sympy.sqrt(sympy.Abs(x)), "sqrt(|x|)"),
    Op("log", 1, k.k_log, sf.plog, "log(|x| + 1e-12)", sympy_head=sf.plog),
    Op("exp", 1, k.k_exp, sympy.exp, "e^min(x, 60)", sympy_head=sympy.exp, increasing=True),
    Op("tanh", 1, k.k_tanh, sympy.tanh, "tanh(x)", sympy_head=sympy.tanh, increasing=True),
    Op("sigmoid", 1, k.k_sigmoid, sf.sigmoid, "1 / (1 + e^-x)", sympy_head=sf.sigmoid, increasing=True),
    Op(
        "mms", 1, k.k_mms, sf.mms, "(x - min) / (max - min) over the matrix",
        sympy_head=sf.mms, increasing=True, matrix_wide=True,
    ),
    Op(
        "zsn", 1, k.k_zsn, sf.zsn, "(x - mean) / std over the matrix (sample std)",
        sympy_head=sf.zsn, increasing=True, matrix_wide=True,
    ),
    Op(
        "rownorm", 1, k.k_rownorm, sf.rownorm, "x / sum_j |x_ij| (row sum, as RIA)",
        sympy_head=sf.rownorm, matrix_wide=True, shape_free_constant=False,
    ),
    Op(
        "colnorm", 1, k.k_colnorm, sf.colnorm, "x / sum_i |x_ij| (column sum, as RIA)",
        sympy_head=sf.colnorm, matrix_wide=True, shape_free_constant=False,
    ),
    Op(
        "rowl2", 1, k.k_rowl2, sf.rowl2, "x / ||x_i,:||_2 (row L2 norm, as Z-Pruner)",
        sympy_head=sf.rowl2, matrix_wide=True, shape_free_constant=False,
    ),
    Op(
        "coll2", 1, k.k_coll2, sf.coll2, "x / ||x_:,j||_2 (column L2 norm, as Z-Pruner)",
        sympy_head=sf.coll2, matrix_wide=True, shape_free_constant=False,
    ),
    Op(
        "lowfrac", 1, k.k_lowfrac, sf.lowfrac, "share of entries with |x| < 0.1 mean|x| (scalar)",
        sympy_head=sf.lowfrac, matrix_wide=True,
    ),
    Op("add", 2, k.k_add, lambda x, y: x + y, "x + y", syntax="infix", symbol="+", precedence=1),
    Op("sub", 2, k.k_sub, lambda x, y: x - y, "x - y", syntax="infix", symbol="-", precedence=1),
    Op("mul", 2, k.k_mul, lambda x, y: x * y, "x * y", syntax="infix", symbol="*", precedence=2),
    Op(
        "div", 2, k.k_div, sf.divide, "x / y, |y| floored at 1e-12 keeping its sign",
        syntax="infix", symbol="/", precedence=2,
    ),
    Op(
        "pow", 2, k.k_pow, sf.power_abs, "|x|^c for a numeric literal c",
        syntax="power", symbol="^", precedence=4, in_pset=False,
    ),
]  # fmt: skip

OPS: dict[str, Op] = {op.name: op for op in _OPS}
INFIX: dict[str, Op] = {op.symbol: op for op in _OPS if op.syntax == "infix"}
SYMPY_HEADS: dict[type, str] = {op.sympy_head: op.name for op in _OPS if op.sympy_head is not None}
INCREASING_HEADS: tuple[type, ...] = tuple(op.sympy_head for op in _OPS if op.increasing)

# Constants the GP may use; the text language accepts any finite numeric literal.
CONSTANTS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0)

# Exponents c of |x|^c the GP may use, exact (a pow literal holds float(c)).
POWER_EXPONENTS: tuple[Fraction, ...] = tuple(map(Fraction, ("1/4", "1/3", "1/2", "2/3", "3/2", "2", "3")))
# Exponents an operator of the table already computes: sqrt(x) = |x|^(1/2), sqr(x) = x^2 = |x|^2.
EXPONENT_OPS: dict[Fraction, str] = {Fraction(1, 2): "sqrt", Fraction(2): "sqr"}


def power_name(exponent: Fraction) -> str:
    """Name of the GP primitive |x|^c: pow1_3 for 1/3, pow3 for 3 (a valid identifier, as DEAP needs)."""
    if exponent.denominator == 1:
        return f"pow{exponent.numerator}"
    return f"pow{exponent.numerator}_{exponent.denominator}"


# GP power primitives by name, in POWER_EXPONENTS order (a rebuilt primitive set is the same set).
POWER_PRIMITIVES: dict[str, Fraction] = {power_name(c): c for c in POWER_EXPONENTS if c not in EXPONENT_OPS}
