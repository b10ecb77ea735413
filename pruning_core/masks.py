"""Masks as pure functions of scores: higher score = keep. Ties are broken deterministically: among
equal scores the weight with the lower index is pruned first (as a stable sort would)."""

from __future__ import annotations

import torch

from pruning_core.errors import UsageError
from pruning_core.spec import SparsitySpec

NETWORK_MAX_GROUP = 8  # N:M groups up to this size find their threshold with a sorting network


def _kth_smallest_small_groups(groups: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) along a short last dim, by odd-even transposition sort: a few
    elementwise min / max over the whole tensor, several times faster than kthvalue on groups of 4 or 8."""
    values = list(groups.unbind(-1))
    size = len(values)
    for round_ in range(size):
        for i in range(round_ % 2, size - 1, 2):
            low, high = torch.minimum(values[i], values[i + 1]), torch.maximum(values[i], values[i + 1])
            values[i], values[i + 1] = low, high
    return values[k - 1].unsqueeze(-1)


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim of ``scores`` with the ``k`` lowest entries of every slice removed.

    Same result as a stable argsort (among equal scores the lower index goes first) but O(n) per slice:
    the k-th smallest value is the threshold, everything below it goes, and of the entries equal to it
    only as many as are still needed, in index order.
    """
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.shape[-1] <= NETWORK_MAX_GROUP:
        threshold = _kth_smallest_small_groups(scores, k)
    else:
        threshold = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    keep = scores > threshold
    if bool((keep.sum(dim=-1) == scores.shape[-1] - k).all()):  # no tie at any threshold: done
        return keep
    below = scores < threshold
    ties = scores == threshold
    still_needed = k - below.sum(dim=-1, keepdim=True)
    pruned = below | (ties & (torch.cumsum(ties, dim=-1) <= still_needed))
    return ~pruned


def keep_mask(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Boolean keep-mask (same shape as ``scores``) for a 2-D score matrix (out x in)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out x in), got shape {tuple(scores.shape)}")
    scores = scores.float()
    rows, cols = scores.shape
    if spec.is_nm:
        if cols % spec.m:
            raise UsageError(f"pattern {spec.n}:{spec.m} needs input size divisible by {spec.m}, got {cols}")
        grouped = scores.reshape(rows, cols // spec.m, spec.m)
        return _prune_lowest(grouped, spec.n).reshape(rows, cols)
    if spec.whole_matrix:
        flat = scores.reshape(1, -1)
        return _prune_lowest(flat, round(spec.sparsity * flat.numel())).reshape(rows, cols)
    return _prune_lowest(scores, round(spec.sparsity * cols))  # "row" (the spec checked its group)


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
