"""Weight updates after any scorer's mask: the scorer decides which weights go, the update moves the
kept weights of each row to compensate, using the layer's calibration Hessian.

  ``obs``    SparseGPT's sequential Optimal Brain Surgeon update for a fixed mask (column by column,
             lazy 128-column blocks); as cheap as SparseGPT's own update.
  ``refit``  the exact least-squares refit of the kept weights of every row (APT's joint update):
             argmin ||(w_hat - w) X|| subject to w_hat = 0 on the pruned set; costlier (one solve of
             the smaller of |pruned| and |kept| unknowns per row).

``with_update(scorer, name)`` turns any scorer (built-in, formula or plugin) into a solver that the
sequential driver runs like SparseGPT; the fitness evaluator calls ``UPDATES`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning_core.errors import UsageError
from pruning_core.scorers.apt import exact_obs_update
from pruning_core.scorers.base import STAT_NAMES, Solver, SparsitySpec
from pruning_core.scorers.sparsegpt import live_weight, obs_prune_with_mask
from pruning_core.sequential import keep_of


def obs_update(weight: torch.Tensor, stats: dict, keep: torch.Tensor) -> torch.Tensor:
    # "obs_factor": the inverse-Hessian Cholesky factor, if a caller that updates often cached it
    return obs_prune_with_mask(weight, stats["hessian"], keep, factor=stats.get("obs_factor"))


def refit_update(weight: torch.Tensor, stats: dict, keep: torch.Tensor) -> torch.Tensor:
    hessian = stats["hessian"]
    return exact_obs_update(live_weight(weight, hessian), hessian, ~keep.to(weight.device, torch.bool))


# name -> (weight, stats with "hessian", keep mask) -> updated float32 weight, pruned entries exactly 0
UPDATES = {"obs": obs_update, "refit": refit_update}
UPDATE_CHOICES = ("none", *UPDATES)


def stats_with_update(stats, update: str) -> tuple[str, ...]:
    """The statistics a scorer reads once followed by ``update``: its own, plus the Hessian."""
    wanted = set(stats) | ({"hessian"} if check_update(update) != "none" else set())
    return tuple(s for s in STAT_NAMES if s in wanted)


def check_update(name: str) -> str:
    if name not in UPDATE_CHOICES:
        raise UsageError(f"unknown update {name!r}; use one of: {', '.join(UPDATE_CHOICES)}")
    return name


@dataclass
class WithUpdate(Solver):
    """``scorer``'s mask followed by the update ``update`` (a key of UPDATES)."""

    scorer: object = None
    update: str = "obs"

    def __post_init__(self):
        if check_update(self.update) == "none":
            raise ValueError("WithUpdate needs an update; use the scorer itself for 'none'")
        self.name = f"{self.scorer.name}+{self.update}"
        self.stats = stats_with_update(self.scorer.stats, self.update)
        self.default_group = self.scorer.default_group
        self.reference = getattr(self.scorer, "reference", "")

    def prune(self, weight: torch.Tensor, stats: dict[str, torch.Tensor], spec: SparsitySpec) -> torch.Tensor:
        return UPDATES[self.update](weight, stats, keep_of(self.scorer, weight, stats, spec))


def split_update(name: str) -> tuple[str, str]:
    """'wanda+obs' -> ('wanda', 'obs'); 'wanda' -> ('wanda', 'none'): a baseline with a weight update."""
    scorer, _, update = name.partition("+")
    return scorer, check_update(update or "none")


def with_update(scorer, update: str):
    """``scorer`` itself for ``update == 'none'``, else the scorer followed by that update."""
    return scorer if check_update(update) == "none" else WithUpdate(scorer=scorer, update=update)
