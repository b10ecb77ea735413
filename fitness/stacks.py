"""The prunable linears of a model stacked by weight shape, so that a candidate scores, checks and chooses
the masks of all q (or all k, ..., all down) projections of every block in a few large operations.

A stack holds its linears' weights (the model's own tensors, which masking overwrites and
``fitness.snapshot`` restores; stacked for a candidate, one stack at a time: a permanent stacked copy
would hold the model twice), their per-column statistics (S, in) and the proxy's sampled rows. Per-weight
statistics (G) stay where the statistics cache keeps them (on the CPU: its file) and are stacked only for
a candidate that reads them, one stack at a time: a permanent stacked copy would hold them in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fitness.stats_cache import StatsCache

# On the CPU a stack holds at most this many weights: temporaries of a stack then stay below the size
# glibc serves from mmap (32 MiB), which would page-fault every large temporary anew on each candidate.
CPU_STACK_WEIGHTS = 1 << 22
PER_COLUMN = ("X", "H")  # statistics with one value per input column, (S, in) when stacked
PER_WEIGHT = ("G",)  # statistics with one value per weight, (S, out, in) when stacked


@dataclass
class LinearStack:
    names: list[str]
    weights: list[torch.Tensor]  # the linears' weights, (out, in) each: the model's, not copies
    columns: dict[str, torch.Tensor]  # PER_COLUMN statistics, (S, in)
    rows: torch.Tensor  # (S, r) the rows of each linear the proxy samples
    sampled: torch.Tensor  # (S, r, in) the dense weights of those rows
    sampled_weight_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # PER_WEIGHT, (S, r, in)

    def stacked(self) -> torch.Tensor:
        """(S, out, in) a copy of the weights as they are now."""
        return torch.stack(self.weights)

    def stats(self, cache: StatsCache, wanted) -> dict[str, torch.Tensor]:
        """The stack's statistics among ``wanted``: per-column ones as kept, per-weight ones stacked now."""
        stats = dict(self.columns)
        for key in PER_WEIGHT:
            if key in wanted:
                stats[key] = torch.stack([cache.stat(name, key) for name in self.names])
        return stats

    def sampled_stats(self, cache: StatsCache, wanted) -> dict[str, torch.Tensor]:
        """The statistics of the sampled rows among ``wanted``; per-weight ones gathered on first use
        (reading them reads the whole statistic, which a formula without it never needs)."""
        for key in PER_WEIGHT:
            if key in wanted and key not in self.sampled_weight_stats:
                per_linear = [cache.stat(name, key) for name in self.names]
                self.sampled_weight_stats[key] = torch.stack([v[r] for v, r in zip(per_linear, self.rows)])
        return {**self.columns, **{k: v for k, v in self.sampled_weight_stats.items() if k in wanted}}


def gather_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """values (S, out, in), rows (S, r) -> (S, r, in)."""
    return values[torch.arange(values.shape[0], device=values.device)[:, None], rows]


@torch.no_grad()
def stack_linears(linears: dict, stats: StatsCache, proxy_rows: dict[str, torch.Tensor]) -> list[LinearStack]:
    """Stacks of linears with one weight shape, dtype and device (in first-seen order; on the CPU at
    most CPU_STACK_WEIGHTS weights each)."""
    by_shape: dict[tuple, list[str]] = {}
    for name, linear in linears.items():
        weight = linear.weight
        by_shape.setdefault((tuple(weight.shape), weight.dtype, weight.device), []).append(name)
    groups = []
    for names in by_shape.values():
        weight = linears[names[0]].weight
        size = max(1, CPU_STACK_WEIGHTS // weight.numel()) if weight.device.type == "cpu" else len(names)
        groups += [names[first : first + size] for first in range(0, len(names), size)]
    stacks = []
    for names in groups:
        weights = [linears[n].weight.detach() for n in names]
        columns = {key: torch.stack([stats.stat(n, key).reshape(-1) for n in names]) for key in PER_COLUMN}
        rows = torch.stack([proxy_rows[n] for n in names])
        sampled = torch.stack([weight[r] for weight, r in zip(weights, rows)])
        stacks.append(LinearStack(names, weights, columns, rows, sampled))
    return stacks
