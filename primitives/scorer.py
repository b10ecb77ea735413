"""A pruning-core Scorer compiled from formula text (the entry point ``pruning_core.formula_language``)."""

from __future__ import annotations

import torch

from primitives.canonical import canonical_key
from primitives.compile import compile_formula
from primitives.grammar import parse_formula
from primitives.known import KNOWN_FORMULAS
from pruning_core.spec import check_group


class FormulaScorer:
    """Scores of a formula's canonical form.

    The canonical form used is the ``matrix`` one: it keeps the order of scores over the whole matrix,
    hence inside every row and N:M group too, so the scores suit whichever group the caller masks with.
    """

    def __init__(self, text: str, group: str | None = None):
        tree = parse_formula(text)
        self.text = text
        self.default_group = check_group(group or "row")
        self._compiled = compile_formula(tree, group="matrix")
        self.name = self._compiled.key
        self.stats = self._compiled.stats
        self.elementwise = self._compiled.elementwise  # scores stacks and row subsets in one call
        self.reference = f"formula {text!r}" + _same_as_known(self.name)

    def score(self, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._compiled(weight, stats)


def _same_as_known(key: str) -> str:
    names = [name for name, text in KNOWN_FORMULAS.items() if canonical_key(text, "matrix") == key]
    return f" (canonical form of the known formula {', '.join(names)})" if names else ""
