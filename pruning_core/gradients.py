"""Per-weight gradient magnitude G = sqrt(sum over calibration samples of the squared LM-loss gradient),
as GBLM-Pruner and Pruner-Zero compute it. Costly (one backward per sample), so cached on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pruning_core.blocks import model_fingerprint, prunable_linears
from pruning_core.files import atomic_path, key_digest


@torch.enable_grad()  # callers may run under no_grad (the fitness evaluator's sequential rung does)
def compute_gradient_magnitudes(
    model, windows: torch.Tensor, progress: bool = True
) -> dict[str, torch.Tensor]:
    """G per prunable linear from one backward pass per calibration window (batch of one)."""
    linears = prunable_linears(model)
    device = next(model.parameters()).device
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for linear in linears.values():
        linear.weight.requires_grad_(True)
    sums = {name: torch.zeros_like(lin.weight, dtype=torch.float32) for name, lin in linears.items()}
    try:
        for window in tqdm(windows, desc="gradients", unit="sample", disable=not progress, leave=False):
            ids = window.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            for name, linear in linears.items():
                grad = linear.weight.grad.float()
                sums[name] += grad * grad
                linear.weight.grad = None
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(saved_flags[name])
    return {name: total.sqrt() for name, total in sums.items()}


def gradient_magnitudes(
    model, windows: torch.Tensor, cache_key: dict, cache_root: Path | None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """G per prunable linear, loaded from ``cache_root`` when the key (model + calibration) matches."""
    from safetensors.torch import load_file, save_file

    key = dict(cache_key, model=model_fingerprint(model))
    path = Path(cache_root) / "gradients" / f"{key_digest(key)}.safetensors" if cache_root else None
    device = next(model.parameters()).device
    if path is not None and path.is_file():
        try:
            return {k: v.to(device) for k, v in load_file(path).items()}
        except Exception:  # a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    grads = compute_gradient_magnitudes(model, windows, progress)
    if path is not None:
        with atomic_path(path) as tmp:
            save_file(
                {k: v.contiguous().cpu() for k, v in grads.items()}, tmp, metadata={"key": json.dumps(key)}
            )
    return grads
