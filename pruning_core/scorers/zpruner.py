"""Z-Pruner (Bhuiyan et al. 2025, "Z-Pruner: Post-Training Pruning of Large Language Models for
Efficiency without Retraining"), the metric of its released code:

  R = W / ||W_i,:||_2 (row-normalised),  C = W / ||W_:,j||_2 (column-normalised)
  z_R = (R - mean R) / std R,  z_C likewise, mean and std over the whole matrix
  importance = a |z_R|^3 + (1 - a) |z_C|^3,  a = 0.7 (1 - 0.3 rho)
  rho = share of weights with |W| < 0.1 mean|W|
  score = importance * ||X_j||_2^1.5

std is the sample standard deviation (n - 1), as torch.std in the released code. The released code
scales activations by sqrt(mean x_j^2), a per-layer constant times ||X_j||_2, which leaves every mask
unchanged. Guards the released code lacks: an all-zero row or column normalises to zeros instead of
NaN, and a matrix with zero (or undefined) spread gets z = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning_core.scorers.base import register

ACTIVATION_POWER = 1.5


def _normalise(weight: torch.Tensor, dim: int) -> torch.Tensor:
    norms = torch.linalg.vector_norm(weight, dim=dim, keepdim=True)
    return weight / torch.where(norms > 0, norms, torch.ones_like(norms))


def _zscore(values: torch.Tensor) -> torch.Tensor:
    """z-score over the whole matrix; 0 where the spread is zero or undefined (one element)."""
    if values.numel() < 2:
        return torch.zeros_like(values)
    std = torch.std(values)
    if not bool(torch.isfinite(std)) or float(std) == 0.0:
        return torch.zeros_like(values)
    return (values - values.mean()) / std


def zpruner_importance(weight: torch.Tensor) -> torch.Tensor:
    """The weight-only part of the metric (before the activation factor), float32."""
    w = weight.float()
    z_row = _zscore(_normalise(w, dim=1))
    z_col = _zscore(_normalise(w, dim=0))
    magnitude = w.abs()
    rho = (magnitude < 0.1 * magnitude.mean()).float().mean()
    alpha = 0.7 * (1.0 - 0.3 * rho)
    return alpha * z_row.abs() ** 3 + (1.0 - alpha) * z_col.abs() ** 3


def zpruner_scores(weight: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Z-Pruner scores (out x in, higher = keep) from W and ||X_j||_2 per input column."""
    activation = x_norm.to(device=weight.device, dtype=torch.float32).reshape(1, -1) ** ACTIVATION_POWER
    return zpruner_importance(weight) * activation


@register
@dataclass(frozen=True)
class ZPruner:
    name: str = "z-pruner"
    stats: tuple[str, ...] = ("X",)
    default_group: str = "matrix"  # as RIA's code, which Z-Pruner's builds on: per row only on request
    reference: str = (
        "Bhuiyan et al. 2025, Z-Pruner: Post-Training Pruning of LLMs for Efficiency without Retraining"
    )

    def score(self, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return zpruner_scores(weight, stats["X"])
