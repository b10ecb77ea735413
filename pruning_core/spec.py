"""What to remove from a weight matrix; shared by masks, scorers and solvers."""

from __future__ import annotations

from dataclasses import dataclass

from pruning_core.errors import UsageError

GROUPS = ("row", "matrix")


def check_group(group: str, what: str = "group") -> str:
    if group not in GROUPS:
        raise UsageError(f"unknown {what} {group!r}; use 'row' (also for N:M) or 'matrix'")
    return group


@dataclass(frozen=True)
class SparsitySpec:
    """What to remove: an unstructured ratio, or N zeros in every M consecutive input weights.
    Checks itself on construction (one-line UsageError)."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    group: str = "row"  # "row": every output row keeps the same count; "matrix": one threshold

    def __post_init__(self):
        check_group(self.group)
        if self.is_nm and not 0 < self.n < self.m:
            raise UsageError(f"pattern {self.n}:{self.m} needs 0 < N < M (e.g. 2:4 or 4:8)")
        if not self.is_nm and not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"sparsity must be in [0, 1), got {self.sparsity}; e.g. --sparsity 0.5")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def whole_matrix(self) -> bool:
        """One threshold over the whole matrix (unstructured, group "matrix"); N:M is chosen per row."""
        return self.group == "matrix" and not self.is_nm

    def with_sparsity(self, sparsity: float) -> SparsitySpec:
        return SparsitySpec(sparsity, self.n, self.m, self.group)

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"
