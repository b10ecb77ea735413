"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): blocks with more outliers keep more.

A block's outlier ratio is the share of its Wanda scores |W_ij| * ||X_j||_2 that exceed M times their
mean, pooled over all linears of the block (one mean over every score of the block, as the released
code concatenates them). Sparsities follow the released code (luuyin/OWL): the ratios are min-max
scaled onto [0, 2*lambda], shifted so their mean is 1 - target, and each block's sparsity is 1 minus
its shifted value, so the block with the most outliers gets the lowest sparsity. The spread is always
2*lambda; with skewed ratios a block may lie further than lambda from the target, as in the released
code. Defaults M = 5, lambda = 0.08 are the paper's LLaMA settings.
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
    *,
    m: float = OWL_M,
) -> float:
    """Share of |W| * ||X|| scores above ``m`` times their mean, in [0, 1].

    Pass one linear as ``(weight, x_norm)``, or a block as a list of ``(weight, x_norm)`` pairs whose
    scores are pooled. ``m`` is keyword-only: a block's pairs fill ``weight`` alone, so a positional
    ``m`` would land in ``x_norm`` unnoticed.
    """
    if not m > 0:
        raise UsageError(f"OWL outlier multiple M must be > 0, got {m}; e.g. --owl-m 5")
    if not isinstance(weight, torch.Tensor) and x_norm is not None:
        raise ValueError("outlier_ratio: pass x_norm inside the (weight, x_norm) pairs of a block")
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
    """Per-block sparsities of the released OWL code: mean = target, max - min = 2 * lam (unless all
    ratios are equal), higher ratio -> lower sparsity. A UsageError when one would leave [0, 1)."""
    if not 0.0 < target < 1.0:
        raise UsageError(f"target sparsity must be in (0, 1), got {target}; e.g. --sparsity 0.7")
    if lam < 0:
        raise UsageError(f"OWL lambda must be >= 0, got {lam}; e.g. --owl-lambda 0.08")
    values = [float(r) for r in ratios]
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:  # the released code divides by zero here; no outlier contrast means no reallocation
        return [target] * len(values)
    # deviations from the target at lambda = 1, each in (-2, 2); the sparsities scale linearly with lambda
    unit = [(v - low) / (high - low) * 2 for v in values]
    unit_mean = sum(unit) / len(unit)
    deviations = [unit_mean - u for u in unit]
    sparsities = [target + lam * d for d in deviations]
    check_owl_range(sparsities, deviations, target, lam)
    return sparsities


def check_owl_range(sparsities: list[float], deviations: list[float], target: float, lam: float) -> None:
    """One line naming the largest lambda that fits, when a block's sparsity would leave [0, 1)."""
    if min(sparsities) >= 0 and max(sparsities) < 1:
        return
    # largest lambda keeping target + lambda * d within [0, 1) for every block
    fits = [(1 - target) / d for d in deviations if d > 0] + [target / -d for d in deviations if d < 0]
    raise UsageError(
        f"OWL block sparsities span [{min(sparsities):g}, {max(sparsities):g}] at target {target:g} "
        f"and lambda {lam:g}, outside [0, 1); use --owl-lambda below {min(fits):.4g}"
    )
