"""The formula language and GP search space: operators, terminals, parser / printer, SymPy canonical
forms, compilation to torch, the DEAP primitive set and the formula scorer.

Formula semantics: see ``primitives.kernels`` (protected operators), ``primitives.terminals`` (the
statistics W, X, G, H, U) and ``primitives.canonical`` (a formula means its canonical form).
"""

from primitives.canonical import canonical_form, canonical_key
from primitives.compile import CompiledFormula, compile_formula
from primitives.grammar import parse_formula
from primitives.known import KNOWN_FORMULAS
from primitives.ops import CONSTANTS, OPS, Op
from primitives.printer import format_formula
from primitives.terminals import TERMINALS
from primitives.tree import Call, Const, Expr, Term

__all__ = [
    "CONSTANTS",
    "KNOWN_FORMULAS",
    "OPS",
    "TERMINALS",
    "Call",
    "CompiledFormula",
    "Const",
    "Expr",
    "Op",
    "Term",
    "canonical_form",
    "canonical_key",
    "compile_formula",
    "format_formula",
    "parse_formula",
]
