"""SparseGPT (Frantar & Alistarh 2023): prune column by column and let the Optimal Brain Surgeon update
move each pruned weight's error onto the not-yet-processed weights of its row.

The damped inverse Hessian is used through its upper Cholesky factor U (H^-1 = U^T U): row j of U,
divided by U_jj, is the OBS update that removing weight j sends to columns > j once columns < j are
fixed, and U_jj^2 is the matching [H^-1]_jj, so the selection criterion w^2 / U_jj^2 is the OBS
saliency of the paper. Updates inside a 128-column block are applied column by column; the block's
accumulated error reaches the later columns in matrix products (the paper's lazy batch update).

Mask selection:
  * N:M: at every group of M consecutive columns, the N lowest w^2 / U_jj^2 of each row, on the
    weights as updated so far (as the paper).
  * unstructured, group "matrix": the paper's adaptive selection: at each block start, the lowest
    scores over the whole block (all rows), so rows and blocks get different counts; the per-block
    quotas are cumulative roundings so the matrix total is exactly round(s * numel).
  * unstructured, group "row": the paper's block-wide selection cannot give every row the same count,
    so each block selects per row instead, still on the updated weights, with a per-row quota of
    round(s * end) - round(s * start) for block [start, end): the quotas telescope, so every row has
    exactly round(s * cols) zeros. On random correlated layers this keeps almost all of the paper's
    adaptivity (output error within ~1.5% of the block-wide rule) and beats choosing each row's mask
    once up front by ~9%.
Inputs never seen in calibration (zero Hessian diagonal) get weight 0, as in the paper; they score 0
and are therefore the first weights each row prunes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pruning_core.errors import UsageError
from pruning_core.linalg import damped_inverse
from pruning_core.masks import keep_above_lowest, keep_mask
from pruning_core.scorers.base import Solver, SparsitySpec, register

BLOCK_SIZE = 128
# Columns whose errors reach the later columns in one product (see sequential_obs)
LAZY_COLUMNS = 256
PERCDAMP = 0.01

# select(first_column, current weights of the span (..., rows, width), the factor's diagonal over the
# span (..., width)) -> pruned mask of the span (..., rows, width)
SpanSelector = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Input columns that calibration never activated (zero Hessian diagonal)."""
    return torch.diagonal(hessian) == 0


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    """Upper Cholesky factor U of the damped inverse Hessian (H^-1 = U^T U), float32."""
    return torch.linalg.cholesky(damped_inverse(hessian, percdamp), upper=True)


def obs_saliency(weight: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
    """The paper's selection criterion w^2 / [H^-1]_jj^2 with the factor's diagonal (higher = keep)."""
    return weight.float() ** 2 / u_diag.reshape(1, -1) ** 2


def span_pruned(scores: torch.Tensor, first: int, spec: SparsitySpec) -> torch.Tensor:
    """Pruned mask of one span of columns [first, first + width) from its scores (rows, width), higher
    = keep: every N:M group's N lowest, or for unstructured sparsity the span's quota per row ("row")
    or over the whole span ("matrix"). Quotas are cumulative roundings, round(s * end) - round(s *
    start) per row (or times rows), so they telescope to exactly round(s * cols) per row (matrix)."""
    if spec.is_nm:
        return ~keep_mask(scores, spec)  # an N:M mask ignores the group
    rows, width = scores.shape
    unit = 1 if spec.group == "row" else rows
    quota = round(spec.sparsity * unit * (first + width)) - round(spec.sparsity * unit * first)
    if spec.group == "row":
        return ~keep_above_lowest(scores, quota)
    return ~keep_above_lowest(scores.reshape(1, -1), quota).reshape(rows, width)


def sequential_obs(
    weight: torch.Tensor, factor: torch.Tensor, select: SpanSelector, span: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W column by column with OBS updates, over any leading batch dimensions (weight (..., rows,
    cols), factor (..., cols, cols)): stacking layers of one shape runs the column loop once for all.
    ``select`` picks the mask of each span of ``span`` columns just before the span is processed, on
    the weights as updated so far. Returns (new float32 weight, pruned entries exactly 0; pruned mask).

    Two levels of lazy updates: a block's error reaches the rest of its group of LAZY_COLUMNS columns at
    the block's end, the group's error the columns after the group at the group's end (one product
    instead of rewriting every later column after every block). Inside a block the weights are held
    transposed, so the column-by-column updates run over contiguous rows."""
    if block_size % span:
        raise ValueError(f"block size {block_size} must be a multiple of the span {span}")
    w = weight.float().clone()
    cols = w.shape[-1]
    group = block_size * max(1, LAZY_COLUMNS // block_size)  # whole blocks, so N:M groups stay aligned
    pruned = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    for first in range(0, cols, group):
        last = min(first + group, cols)
        errors = torch.empty((*w.shape[:-1], last - first), dtype=w.dtype, device=w.device)
        for start in range(first, last, block_size):
            end = min(start + block_size, last)
            block_errors = _obs_block(w, factor, select, span, pruned, start, end)
            w[..., end:last] -= block_errors @ factor[..., start:end, end:last]
            errors[..., start - first : end - first] = block_errors
        w[..., last:] -= errors @ factor[..., first:last, last:]
    return w, pruned


def _obs_block(w, factor, select: SpanSelector, span: int, pruned, start: int, end: int) -> torch.Tensor:
    """Columns [start, end) of ``w`` pruned and updated in place and their pruned mask written to
    ``pruned``; returns their OBS errors (..., rows, width). The later columns are left to the caller."""
    block = w[..., start:end].transpose(-1, -2).contiguous()  # (..., width, rows)
    block_factor = factor[..., start:end, start:end]
    # [..., j', j, 0] = U[j, j']: column j's update of column j', as a column over the rows
    updates = block_factor.transpose(-1, -2).unsqueeze(-1)
    diag = torch.diagonal(block_factor, dim1=-2, dim2=-1).unsqueeze(-1)  # (..., width, 1)
    block_pruned = torch.empty(block.shape, dtype=torch.bool, device=w.device)
    block_errors = torch.empty_like(block)
    for j in range(end - start):
        if j % span == 0:
            stop = min(j + span, end - start)
            span_weights = block[..., j:stop, :].transpose(-1, -2).contiguous()
            block_pruned[..., j:stop, :] = select(start + j, span_weights, diag[..., j:stop, 0]).transpose(
                -1, -2
            )
        error = torch.where(block_pruned[..., j, :], block[..., j, :], 0.0) / diag[..., j, :]
        # OBS: removing w_j shifts the later weights of the row by -w_j / U_jj * U_j,j'
        block[..., j:, :] -= updates[..., j:, j, :] * error.unsqueeze(-2)
        block_errors[..., j, :] = error
    pruned[..., start:end] = block_pruned.transpose(-1, -2)
    w[..., start:end] = block.masked_fill_(block_pruned, 0.0).transpose(-1, -2)
    return block_errors.transpose(-1, -2)


def live_weight(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """A float32 copy of the weight with the inputs calibration never saw zeroed (as the paper)."""
    w = weight.float().clone()
    w[:, dead_inputs(hessian.to(w.device))] = 0.0
    return w


def live_weight_and_factor(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (float32, dead inputs zeroed) and the inverse-Hessian factor, on the weight's device."""
    hessian = hessian.to(device=weight.device, dtype=torch.float32)
    return live_weight(weight, hessian), inverse_hessian_factor(hessian, percdamp)


def obs_fixed_mask(
    weight: torch.Tensor, factor: torch.Tensor, pruned: torch.Tensor, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """The sequential OBS update for a mask fixed in advance, over any leading batch dimensions: weight
    and pruned (..., rows, cols), factor (..., cols, cols). Pruned entries come out exactly 0."""

    def fixed(first: int, span_weights: torch.Tensor, _diag: torch.Tensor) -> torch.Tensor:
        return pruned[..., first : first + span_weights.shape[-1]]

    return sequential_obs(weight, factor, fixed, block_size, block_size)[0]


def obs_prune_with_mask(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    block_size: int = BLOCK_SIZE,
    percdamp: float = PERCDAMP,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """SparseGPT's sequential OBS update for a fixed boolean keep mask (out x in); float32 result
    with the pruned entries exactly 0. ``factor``: ``inverse_hessian_factor(hessian, percdamp)`` if
    the caller already has it (it depends on the Hessian only, not on the mask)."""
    if factor is None:
        w, factor = live_weight_and_factor(weight, hessian, percdamp)
    else:
        w = live_weight(weight, hessian)
    return obs_fixed_mask(w, factor, ~keep.to(device=w.device, dtype=torch.bool), block_size)


def check_nm_columns(spec: SparsitySpec, cols: int) -> None:
    if spec.is_nm and cols % spec.m:
        raise UsageError(f"pattern {spec.n}:{spec.m} needs input size divisible by {spec.m}, got {cols}")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: SparsitySpec,
    block_size: int = BLOCK_SIZE,
    percdamp: float = PERCDAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: (new float32 weight with pruned entries exactly 0, pruned mask)."""
    check_nm_columns(spec, weight.shape[1])
    w, factor = live_weight_and_factor(weight, hessian, percdamp)
    if spec.is_nm:  # blocks must hold whole N:M groups
        block_size = max(spec.m, block_size - block_size % spec.m)
    # N:M: every group of M columns; unstructured: every block, per row or over the block's rows
    span = spec.m if spec.is_nm else block_size

    def select(first: int, span_weights: torch.Tensor, span_diag: torch.Tensor) -> torch.Tensor:
        return span_pruned(obs_saliency(span_weights, span_diag), first, spec)

    return sequential_obs(w, factor, select, span, block_size)


@register
@dataclass(frozen=True)
class SparseGPT(Solver):
    """Registered solver; ``prune`` returns the updated float32 weight."""

    name: str = "sparsegpt"
    stats: tuple[str, ...] = ("hessian",)
    default_group: str = "matrix"  # the paper's adaptive mask: lowest saliencies of each block, all rows
    reference: str = (
        "Frantar & Alistarh 2023, SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
    )
    block_size: int = BLOCK_SIZE
    percdamp: float = PERCDAMP

    def prune(self, weight: torch.Tensor, stats: dict[str, torch.Tensor], spec: SparsitySpec) -> torch.Tensor:
        return sparsegpt_prune(weight, stats["hessian"], spec, self.block_size, self.percdamp)[0]
