"""Perplexity with the canonical SparseGPT/Wanda protocol: non-overlapping windows of the once-tokenized
corpus, tail dropped, ppl = exp(mean NLL over every predicted token)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pruning_core.errors import UsageError

NLL_SLICE_LOGITS = 1 << 21  # logits per cross-entropy call on the CPU (8 MiB)


def max_positions(model) -> int | None:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(model, seqlen: int) -> None:
    if seqlen < 2:
        raise UsageError(f"--seqlen must be >= 2, got {seqlen}")
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise UsageError(
            f"--seqlen {seqlen} is longer than the model allows ({limit}); use --seqlen <= {limit}"
        )


def make_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(numel // seqlen, seqlen) non-overlapping windows; optionally only the first ``max_windows``."""
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"--max-windows must be >= 1, got {max_windows}")
    count = token_ids.numel() // seqlen
    if count == 0:
        raise UsageError(f"the text has {token_ids.numel()} tokens, fewer than --seqlen {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return token_ids[: count * seqlen].reshape(count, seqlen)


def window_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per window (float64), from logits (b, t, V) and token ids (b, t)."""
    vocab = logits.shape[-1]
    # On the CPU, slices of positions whose log-softmax fits in the cache: over a whole window it would run
    # from main memory (~3x slower at 512 x 49k logits). Each position's loss is the same either way.
    step = max(1, NLL_SLICE_LOGITS // vocab) if logits.device.type == "cpu" else logits.shape[1]
    sums = []
    for predicting, ids in zip(logits[:, :-1], windows):
        targets = ids[1:]
        losses = [
            F.cross_entropy(
                predicting[first : first + step].float(), targets[first : first + step], reduction="none"
            )
            for first in range(0, targets.numel(), step)
        ]
        sums.append(torch.cat(losses).sum(dtype=torch.float64))
    return torch.stack(sums)


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> torch.Tensor:
    """Summed next-token NLL of every window (n,), float64 on the CPU: what paired comparisons need."""
    device = next(model.parameters()).device
    parts = []
    batches = range(0, windows.shape[0], batch_size)
    for first in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        batch = windows[first : first + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        parts.append(window_nll(logits, batch).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(parts)


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of ``model`` over ``windows`` (n, seqlen); returns ppl, nll, tokens, windows, seconds."""
    start = time.perf_counter()
    total = window_nlls(model, windows, batch_size, progress).sum()
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    nll = total.item() / predicted
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": int(windows.numel()),
        "windows": int(windows.shape[0]),
        "seconds": time.perf_counter() - start,
    }
