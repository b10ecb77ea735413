"""Score-only built-ins: pure functions of (W, stats), registered by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning_core.scorers.base import register

EPS = 1e-12


def min_max_scale(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over the whole matrix; all-equal input maps to zeros."""
    low, high = x.min(), x.max()
    return (x - low) / (high - low).clamp_min(EPS)


@register
@dataclass(frozen=True)
class Magnitude:
    name: str = "magnitude"
    stats: tuple = ()
    default_group: str = "matrix"  # Wanda's magnitude baseline uses one threshold per layer
    reference: str = "Han et al. 2015, Learning both Weights and Connections"

    def score(self, weight, stats):
        return weight.float().abs()


@register
@dataclass(frozen=True)
class Wanda:
    name: str = "wanda"
    stats: tuple = ("X",)
    default_group: str = "row"
    reference: str = "Sun et al. 2024, A Simple and Effective Pruning Approach for LLMs (Wanda)"

    def score(self, weight, stats):
        return weight.float().abs() * stats["X"].float().unsqueeze(0)


@register
@dataclass(frozen=True)
class RIA:
    """Relative importance (|W| over its row sum plus over its column sum) times ||X_j||^a."""

    name: str = "ria"
    stats: tuple = ("X",)
    default_group: str = "matrix"  # the official code compares per row only with --per_outneuron
    reference: str = "Zhang et al. 2024, Plug-and-Play (RIA), ICLR"
    power: float = 0.5

    def score(self, weight, stats):
        w = weight.float().abs()
        relative = w / w.sum(dim=1, keepdim=True).clamp_min(EPS) + w / w.sum(dim=0, keepdim=True).clamp_min(
            EPS
        )
        return relative * stats["X"].float().pow(self.power).unsqueeze(0)


@register
@dataclass(frozen=True)
class PrunerZero:
    """The metric Pruner-Zero's search found and released: |W * W| * mms(G)."""

    name: str = "pruner-zero"
    stats: tuple = ("G",)
    default_group: str = "row"
    reference: str = "Dong et al. 2024, Pruner-Zero, ICML"

    def score(self, weight, stats):
        w = weight.float()
        return (w * w) * min_max_scale(stats["G"].float())
