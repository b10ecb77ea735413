"""An independent reference for keep-masks: a stable argsort prunes the lowest scores of each group."""

from __future__ import annotations

import torch

from pruning_core.spec import SparsitySpec


def stable_keep(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep-mask of one (out, in) score matrix: the lowest of each row, N:M group or the whole matrix
    are pruned, ties by index as a stable sort orders them."""
    rows, cols = scores.shape
    if spec.is_nm:
        groups, count = scores.reshape(rows, cols // spec.m, spec.m), spec.n
    elif spec.whole_matrix:
        groups, count = scores.reshape(1, -1), round(spec.sparsity * rows * cols)
    else:
        groups, count = scores, round(spec.sparsity * cols)
    order = torch.argsort(groups, dim=-1, stable=True)
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, order[..., :count], False)
    return keep.reshape(rows, cols)
