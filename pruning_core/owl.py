"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): blocks with more outliers keep more.

A block's outlier ratio is the share of its Wanda scores |W_ij| * ||X_j||_2 that exceed M times their
mean, pooled over all linears of the block (one mean over every score of the block, as the released
code concatenates them). Sparsities follow the released code: the ratios are mapped linearly onto a
span of 2*lambda, centred so the mean sparsity equals the target, and the block with the most outliers
gets the lowest sparsity. The paper also bounds every sparsity to [target - lambda, target + lambda];
that centring alone can overshoot the bound when the ratios are skewed, so the deviations from the
target are then scaled down just enough to fit (the order and the mean are unchanged).
Defaults M = 5, lambda = 0.08 are the paper's LLaMA settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pruning_core.errors import UsageError

OWL_M = 5.0
OWL_LAMBDA = 0.08


def outlier_ratio(
    weight: torch.Tensor | Sequence[tuple[torch.Tensor, torch.Tensor]],
    x_norm: torch.Tensor | None = None,
    m: float = OWL_M,
) -> float:
    """Share of |W| * ||X|| scores above ``m`` times their mean, in [0, 1].

    Pass one linear as ``(weight, x_norm)``, or a block as a list of ``(weight, x_norm)`` pairs whose
    scores are pooled.
    """
    if not m > 0:
        raise UsageError(f"OWL outlier multiple M must be > 0, got {m}; e.g. --owl-m 5")
    pairs = [(weight, x_norm)] if isinstance(weight, torch.Tensor) else list(weight)
    if not pairs or any(x is None for _, x in pairs):
        raise ValueError("outlier_ratio needs (weight, x_norm) for at least one linear")
    scores = [w.float().abs() * x.to(device=w.device, dtype=torch.float32).reshape(1, -1) for w, x in pairs]
    # pooled mean without concatenating the (possibly large) score matrices
    count = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / count
    above = sum(int((s > m * mean).sum()) for s in scores)
    return above / count


def owl_sparsities(ratios: Sequence[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Per-block sparsities in [target - lam, target + lam], mean = target, higher ratio -> lower."""
    if not 0.0 < target < 1.0:
        raise UsageError(f"target sparsity must be in (0, 1), got {target}; e.g. --sparsity 0.7")
    if lam < 0:
        raise UsageError(f"OWL lambda must be >= 0, got {lam}; e.g. --owl-lambda 0.08")
    if target - lam < 0 or target + lam >= 1:
        raise UsageError(
            f"OWL range target±lambda = [{target - lam:g}, {target + lam:g}] leaves [0, 1); "
            f"use --owl-lambda below {min(target, 1 - target):g}"
        )
    values = [float(r) for r in ratios]
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [target] * len(values)
    spread = [(v - low) / (high - low) * 2 * lam for v in values]
    centre = sum(spread) / len(spread)
    deviations = [centre - s for s in spread]  # more outliers -> below the target
    largest = max(abs(d) for d in deviations)
    if largest > lam:
        deviations = [d * lam / largest for d in deviations]
    return [target + d for d in deviations]
