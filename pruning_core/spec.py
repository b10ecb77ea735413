"""What to remove from a weight matrix; shared by masks, scorers and solvers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SparsitySpec:
    """What to remove: an unstructured ratio, or N zeros in every M consecutive input weights."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    group: str = "row"  # "row": every output row keeps the same count; "matrix": one threshold

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def with_sparsity(self, sparsity: float) -> SparsitySpec:
        return SparsitySpec(sparsity, self.n, self.m, self.group)

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"
