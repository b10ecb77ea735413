"""The scorer protocol and the registry that the CLI, the driver and plugins share.

A scorer declares the calibration statistics it needs and maps a weight matrix plus those statistics to
scores (higher = keep). A solver (SparseGPT, APT) instead implements ``prune`` and returns updated
weights. Statistics are a dict keyed by name, each aligned with the layer's weight W (out x in):

  ``X``        (in,)      ||X_j||_2 over calibration tokens (sqrt of the sum of x_j^2)
  ``hessian``  (in, in)   2/n * X X^T, for solvers and the H / U primitives
  ``G``        (out, in)  per-weight gradient magnitude: sqrt(sum over samples of grad^2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from pruning_core.errors import UsageError
from pruning_core.spec import SparsitySpec

STAT_NAMES = ("X", "hessian", "G")


@runtime_checkable
class Scorer(Protocol):
    """What the driver needs of a score-only scorer (built-ins are frozen dataclasses with ``@register``)."""

    name: str
    stats: tuple[str, ...]
    default_group: str
    reference: str

    def score(self, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor: ...


@dataclass(frozen=True)
class Solver:
    """Base for scorers that also update the kept weights (prune returns the new weight)."""

    name: str = ""
    stats: tuple[str, ...] = ("hessian",)
    default_group: str = "row"
    reference: str = ""

    def prune(self, weight: torch.Tensor, stats: dict[str, torch.Tensor], spec: SparsitySpec) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: dict[str, Scorer | Solver] = {}


def register(scorer):
    """Register a scorer instance under its name (used as a decorator on a zero-arg class too)."""
    instance = scorer() if isinstance(scorer, type) else scorer
    if instance.name in _REGISTRY:
        raise ValueError(f"scorer {instance.name!r} registered twice")
    _REGISTRY[instance.name] = instance
    return scorer


def registered() -> dict[str, Scorer | Solver]:
    return dict(_REGISTRY)


def get_scorer(name: str) -> Scorer | Solver:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UsageError(f"unknown scorer {name!r}; choose one of: {known} (or pass --formula TEXT)")
    return _REGISTRY[name]
