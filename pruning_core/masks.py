"""Masks as pure functions of scores: higher score = keep. Ties are broken deterministically: among
equal scores the weight with the lower index is pruned first (as a stable sort would)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pruning_core.errors import UsageError
from pruning_core.spec import SparsitySpec

NETWORK_MAX_GROUP = 8  # N:M groups up to this size find their threshold with a sorting network
# On the CPU numpy's introselect finds a k-th smallest value ~3x faster than torch.kthvalue; slices
# are split into chunks of at least this many values that threads partition in parallel (numpy
# releases the GIL).
SELECT_CHUNK = 1 << 20
_select_pool: ThreadPoolExecutor | None = None


def _sorted_small_groups(groups: torch.Tensor) -> list[torch.Tensor]:
    """The values of a short last dim in ascending order (one tensor per position), by odd-even
    transposition sort: a few elementwise min / max over the whole tensor, several times faster than
    kthvalue on groups of 4 or 8."""
    values = list(groups.unbind(-1))
    size = len(values)
    for round_ in range(size):
        for i in range(round_ % 2, size - 1, 2):
            low, high = torch.minimum(values[i], values[i + 1]), torch.maximum(values[i], values[i + 1])
            values[i], values[i + 1] = low, high
    return values


def _keep_above_lowest_cpu(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``keep_above_lowest`` for a contiguous float32 CPU tensor: numpy's partition finds each slice's k-th
    smallest (1-based), on chunks of whole slices in parallel threads. Everything in a chunk, the ties
    at the threshold included, is decided in its thread: torch ops in between would make torch's
    OpenMP workers compete with the threads (and a torch gather of the tied slices costs more than the
    selection when scores take few distinct values, as the weights of a half-precision model do)."""
    global _select_pool
    flat = scores.detach().reshape(-1, scores.shape[-1]).numpy()
    slices, size = flat.shape
    per_chunk = max(1, SELECT_CHUNK // size)
    chunks = [slice(first, first + per_chunk) for first in range(0, slices, per_chunk)]
    keep = np.empty(flat.shape, dtype=np.bool_)

    def select(part: slice) -> None:
        values, kept = flat[part], keep[part]
        threshold = np.partition(values, k - 1, axis=-1)[:, k - 1 : k]
        np.greater(values, threshold, out=kept)
        if np.count_nonzero(kept) == values.shape[0] * (size - k):
            return  # no slice has a tie at its threshold: each kept exactly size - k
        tied = np.flatnonzero(np.count_nonzero(kept, axis=1) != size - k)
        tied_values, at = values[tied], threshold[tied]
        below, ties = tied_values < at, tied_values == at
        still_needed = k - np.count_nonzero(below, axis=1, keepdims=True)
        kept[tied] = ~(below | (ties & (np.cumsum(ties, axis=1) <= still_needed)))

    workers = min(len(chunks), torch.get_num_threads(), os.cpu_count() or 1)
    if workers > 1:
        if _select_pool is None:
            _select_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        list(_select_pool.map(select, chunks))
    else:
        for part in chunks:
            select(part)
    return torch.from_numpy(keep).reshape(scores.shape)


def keep_above_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim of ``scores`` with the ``k`` lowest entries of every slice removed.

    Same result as a stable argsort (among equal scores the lower index goes first) but O(n) per slice:
    the k-th smallest value is the threshold, everything below it goes, and of the entries equal to it
    only as many as are still needed, in index order. Only the slices with a tie at their threshold
    (found by counting what the threshold keeps) take that second step.
    """
    size = scores.shape[-1]
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= size:
        return torch.zeros_like(scores, dtype=torch.bool)
    scores = scores.contiguous()
    if size > NETWORK_MAX_GROUP and scores.device.type == "cpu" and scores.dtype == torch.float32:
        return _keep_above_lowest_cpu(scores, k)
    if size <= NETWORK_MAX_GROUP:
        ordered = _sorted_small_groups(scores)
        threshold = ordered[k - 1].unsqueeze(-1)
        keep = scores > threshold
        # a group keeps too few exactly when its next larger value equals its threshold
        tie = ordered[k] == ordered[k - 1]
        tied = tie.flatten().nonzero().flatten() if bool(tie.any()) else tie.new_empty(0, dtype=torch.long)
    else:
        threshold = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
        keep = scores > threshold
        # Every slice has at least k entries <= its k-th smallest: the total kept is slices * (size - k)
        # only if no slice has a tie at its threshold (one count, not one per slice, in the usual case).
        tied = torch.empty(0, dtype=torch.long, device=scores.device)
        if int(torch.count_nonzero(keep)) != keep.numel() // size * (size - k):
            tied = (torch.count_nonzero(keep.reshape(-1, size), dim=-1) != size - k).nonzero().flatten()
    if tied.numel():
        tied = tied.to(scores.device)
        values = scores.reshape(-1, size)[tied]
        at = threshold.reshape(-1, 1)[tied]
        below, ties = values < at, values == at
        still_needed = k - below.sum(dim=-1, keepdim=True)
        keep.view(-1, size)[tied] = ~(below | (ties & (torch.cumsum(ties, dim=-1) <= still_needed)))
    return keep


def keep_mask(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Boolean keep-mask (same shape as ``scores``) for score matrices (..., out, in): each trailing
    (out x in) matrix is masked on its own, so a stack of layers of one shape is masked at once."""
    if scores.dim() < 2:
        raise ValueError(f"scores must be (..., out, in), got shape {tuple(scores.shape)}")
    scores = scores.float()
    shape = scores.shape
    rows, cols = shape[-2:]
    if spec.is_nm:
        if cols % spec.m:
            raise UsageError(f"pattern {spec.n}:{spec.m} needs input size divisible by {spec.m}, got {cols}")
        grouped = scores.reshape(-1, cols // spec.m, spec.m)
        return keep_above_lowest(grouped, spec.n).reshape(shape)
    if spec.whole_matrix:
        flat = scores.reshape(-1, rows * cols)
        return keep_above_lowest(flat, round(spec.sparsity * rows * cols)).reshape(shape)
    return keep_above_lowest(scores, round(spec.sparsity * cols))  # "row" (the spec checked its group)


def parse_pattern(text: str | None, sparsity: float | None) -> tuple[float, int, int]:
    """Parse ``--pattern`` (``N:M``) and ``--sparsity`` into (sparsity, n, m); m == 0 = unstructured."""
    if text in (None, "", "unstructured"):
        if sparsity is None or not 0.0 < sparsity < 1.0:
            raise UsageError(f"--sparsity must be a number in (0, 1), got {sparsity}; e.g. --sparsity 0.5")
        return float(sparsity), 0, 0
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--pattern must look like N:M with integers (e.g. 2:4), got {text!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise UsageError(f"--pattern {text!r} needs 0 < N < M (e.g. 2:4 or 4:8)")
    return n / m, n, m


def parse_setting(item: str, flag: str = "--settings") -> tuple[float, int, int]:
    """One setting, N:M or a sparsity like 0.5, as (sparsity, n, m); a bad item is one line naming ``flag``."""
    if ":" in item:
        return parse_pattern(item, None)
    try:
        sparsity = float(item)
    except ValueError as err:
        raise UsageError(f"{flag} item {item!r} is neither a sparsity like 0.5 nor N:M like 2:4") from err
    return parse_pattern(None, sparsity)


def parse_settings(text: str) -> tuple[str, ...]:
    """``--settings 0.5,2:4`` -> normalized labels ('0.5', '2:4'), without repeats; each is checked."""
    labels: dict[str, None] = {}
    for item in (part.strip() for part in text.split(",")):
        if item:
            sparsity, n, m = parse_setting(item)
            labels[f"{n}:{m}" if m else f"{sparsity:g}"] = None
    if not labels:
        raise UsageError("--settings is empty; pass e.g. --settings 0.5,2:4")
    return tuple(labels)


def setting_spec(label: str, group: str = "row") -> SparsitySpec:
    """A normalized setting label ('0.5' or '2:4') as a spec; N:M always ranks within rows."""
    if ":" in label:
        sparsity, n, m = parse_pattern(label, None)
        return SparsitySpec(sparsity, n, m, "row")
    return SparsitySpec(float(label), group=group)
