"""Weight updates after any scorer's mask: the scorer decides which weights go, the update moves the
kept weights of each row to compensate, using the layer's calibration Hessian.

  ``obs``    SparseGPT's sequential Optimal Brain Surgeon update for a fixed mask (column by column,
             lazy 128-column blocks); as cheap as SparseGPT's own update.
  ``refit``  the exact least-squares refit of the kept weights of every row (the joint update APT
             applies span by span, over the whole row at once):
             argmin ||(w_hat - w) X|| subject to w_hat = 0 on the pruned set; costlier (one solve of
             the smaller of |pruned| and |kept| unknowns per row).
  ``adaptive`` SparseGPT's adaptive mask selection with the scorer as the criterion: inside the OBS
             column loop the scorer re-chooses the mask of each span (every N:M group, or every
             ADAPTIVE_SPAN columns) on the weights as updated so far, so the mask and the update fit
             each other. The scorer sees the span alone: its columns' weights and statistics, with
             the Hessian as H = [H^-1]_jj; row-wise and whole-matrix statistics run over the span.

``with_update(scorer, name)`` turns any scorer (built-in, formula or plugin) into a solver that the
sequential driver runs like SparseGPT; the fitness evaluator calls ``UPDATES`` and ``adaptive_obs``
directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning_core.errors import UsageError
from pruning_core.linalg import inverse_hessian_diag
from pruning_core.scorers.apt import exact_obs_update
from pruning_core.scorers.base import STAT_NAMES, Solver, SparsitySpec
from pruning_core.scorers.sparsegpt import (
    BLOCK_SIZE,
    inverse_hessian_factor,
    live_weight,
    obs_prune_with_mask,
    sequential_obs,
    span_pruned,
)
from pruning_core.sequential import keep_of

ADAPTIVE_SPAN = 32  # unstructured: columns whose masks the scorer chooses at once (N:M: each group)


def obs_update(weight: torch.Tensor, stats: dict, keep: torch.Tensor) -> torch.Tensor:
    # "obs_factor": the inverse-Hessian Cholesky factor, if a caller that updates often cached it
    return obs_prune_with_mask(weight, stats["hessian"], keep, factor=stats.get("obs_factor"))


def refit_update(weight: torch.Tensor, stats: dict, keep: torch.Tensor) -> torch.Tensor:
    hessian = stats["hessian"]
    return exact_obs_update(live_weight(weight, hessian), hessian, ~keep.to(weight.device, torch.bool))


# name -> (weight, stats with "hessian", keep mask) -> updated float32 weight, pruned entries exactly 0
UPDATES = {"obs": obs_update, "refit": refit_update}
UPDATE_CHOICES = ("none", *UPDATES, "adaptive")


def span_statistics(stats: dict, shape: tuple[int, int]):
    """``(lo, hi) -> the statistics of columns [lo, hi)`` for a layer of weight ``shape``: per-column and
    per-weight tensors sliced by column, the Hessian replaced by H = [H^-1]_jj (a span of columns has
    no Hessian of its own; H is the formula terminal's meaning)."""
    rows, cols = shape
    columns = {}
    for key, value in stats.items():
        if key == "H" or (key != "hessian" and value.numel() == cols):
            columns[key] = value.reshape(cols)  # per column, 1-D as the scorers read it
        elif tuple(value.shape) == (rows, cols):
            columns[key] = value
    if "H" not in columns and "hessian" in stats:
        columns["H"] = inverse_hessian_diag(stats["hessian"].float())
    return lambda lo, hi: {key: value[..., lo:hi] for key, value in columns.items()}


def _usage_check(scorer):
    def check(scores: torch.Tensor, weight: torch.Tensor) -> None:
        if scores.shape != weight.shape:
            raise UsageError(
                f"scorer {scorer.name!r} returned shape {tuple(scores.shape)} for {tuple(weight.shape)}"
            )
        if not torch.isfinite(scores).all():
            raise UsageError(
                f"scorer {scorer.name!r} produced NaN/inf scores; fix the formula or the statistics"
            )

    return check


def adaptive_obs(
    scorer, weights: torch.Tensor, factors: torch.Tensor, span_stats: list, spec: SparsitySpec,
    check=None, block_size: int = BLOCK_SIZE,
) -> torch.Tensor:  # fmt: skip
    """``scorer``'s masks chosen inside the OBS column loop, for a stack of layers of one shape:
    weights (S, rows, cols) with dead inputs zeroed, factors (S, cols, cols) from
    ``inverse_hessian_factor``, ``span_stats[s]`` from ``span_statistics``. ``check(scores, weight)``
    raises on bad scores. Returns the updated weights, pruned entries exactly 0."""
    check = check or _usage_check(scorer)
    span = spec.m if spec.is_nm else ADAPTIVE_SPAN
    block = span * max(1, block_size // span)

    def select(first: int, span_weights: torch.Tensor, _diag: torch.Tensor) -> torch.Tensor:
        last = first + span_weights.shape[-1]
        masks = []
        for weight, stats_of in zip(span_weights, span_stats):
            scores = scorer.score(weight, stats_of(first, last))
            check(scores, weight)
            masks.append(span_pruned(scores.float(), first, spec))
        return torch.stack(masks)

    return sequential_obs(weights, factors, select, span, block)[0]


def adaptive_prune(scorer, weight: torch.Tensor, stats: dict, spec: SparsitySpec) -> torch.Tensor:
    """One layer pruned by ``adaptive_obs``."""
    hessian = stats["hessian"].to(device=weight.device, dtype=torch.float32)
    w = live_weight(weight, hessian)
    factor = stats.get("obs_factor")
    factor = inverse_hessian_factor(hessian) if factor is None else factor
    statistics = span_statistics(stats, tuple(weight.shape))
    return adaptive_obs(scorer, w[None], factor[None], [statistics], spec)[0]


def stats_with_update(stats, update: str) -> tuple[str, ...]:
    """The statistics a scorer reads once followed by ``update``: its own, plus the Hessian."""
    wanted = set(stats) | ({"hessian"} if check_update(update) != "none" else set())
    return tuple(s for s in STAT_NAMES if s in wanted)


def check_update(name: str) -> str:
    if name not in UPDATE_CHOICES:
        raise UsageError(f"unknown update {name!r}; use one of: {', '.join(UPDATE_CHOICES)}")
    return name


@dataclass(frozen=True)
class WithUpdate(Solver):
    """``scorer``'s mask followed by the update ``update`` (a key of UPDATES)."""

    scorer: object = None
    update: str = "obs"

    def __post_init__(self):
        if check_update(self.update) == "none":
            raise ValueError("WithUpdate needs an update; use the scorer itself for 'none'")
        if self.update == "adaptive" and hasattr(self.scorer, "prune"):
            raise UsageError(
                f"{self.scorer.name} chooses its mask inside its own update; use --update none, obs or "
                "refit with it, not adaptive"
            )
        derived = {
            "name": f"{self.scorer.name}+{self.update}",
            "stats": stats_with_update(self.scorer.stats, self.update),
            "default_group": self.scorer.default_group,
            "reference": getattr(self.scorer, "reference", ""),
        }
        for field_name, value in derived.items():  # frozen: derived fields are set once, here
            object.__setattr__(self, field_name, value)

    def prune(self, weight: torch.Tensor, stats: dict[str, torch.Tensor], spec: SparsitySpec) -> torch.Tensor:
        if self.update == "adaptive":
            return adaptive_prune(self.scorer, weight, stats, spec)
        return UPDATES[self.update](weight, stats, keep_of(self.scorer, weight, stats, spec))


def split_update(name: str) -> tuple[str, str]:
    """'wanda+obs' -> ('wanda', 'obs'); 'wanda' -> ('wanda', 'none'): a baseline with a weight update."""
    scorer, _, update = name.partition("+")
    return scorer, check_update(update or "none")


def with_update(scorer, update: str):
    """``scorer`` itself for ``update == 'none'``, else the scorer followed by that update."""
    return scorer if check_update(update) == "none" else WithUpdate(scorer=scorer, update=update)
