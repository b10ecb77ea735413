"""Generic decoder-block discovery and input capture: no per-architecture code."""

from __future__ import annotations

import contextlib
import json

import torch
from torch import nn

from pruning_core.errors import UsageError
from pruning_core.files import key_digest


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated decoder blocks: the ModuleList of one class, preferring classes the model
    lists in ``_no_split_modules``, then the most parameters."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        has_linear = any(isinstance(m, nn.Linear) for m in module[0].modules())
        if not has_linear:
            continue
        rank = (classes.pop().__name__ in no_split, sum(p.numel() for p in module.parameters()))
        if best is None or rank > best[0]:
            best = (rank, name, module)
    if best is None:
        raise UsageError(
            f"no decoder blocks found in {type(model).__name__} (no ModuleList of repeated layers with "
            "nn.Linear); pass a decoder-only causal LM"
        )
    return best[1], best[2]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


class _Captured(Exception):
    pass


class BlockInputs:
    """The calibration inputs of one block: hidden states per batch plus the extra call arguments
    (attention mask, position ids/embeddings...) the model passed, replayed unchanged for every block."""

    def __init__(self, hidden: list[torch.Tensor], args: list[tuple], kwargs: list[dict], store_device):
        self.hidden, self.args, self.kwargs, self.store_device = hidden, args, kwargs, store_device

    def run(self, block: nn.Module, compute_device, keep_outputs: bool = True) -> None:
        """Run ``block`` over every batch; with ``keep_outputs`` the outputs become the next inputs."""
        for i, hidden in enumerate(self.hidden):
            out = block(hidden.to(compute_device), *self.args[i], **self.kwargs[i])
            out = out[0] if isinstance(out, (tuple, list)) else out
            if keep_outputs:
                self.hidden[i] = out.to(self.store_device)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_inputs(
    model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int, offload: bool
) -> BlockInputs:
    """Run the model up to ``first_block`` for each batch of windows and record its call arguments."""
    device = next(model.parameters()).device
    store = torch.device("cpu") if offload else device
    hidden, args, kwargs = [], [], []

    def grab(_module, call_args, call_kwargs):
        call_kwargs = dict(call_kwargs)
        state = call_kwargs.pop("hidden_states", None)
        if state is None:
            state, call_args = call_args[0], call_args[1:]
        call_kwargs["use_cache"] = False
        for key in ("past_key_values", "past_key_value", "cache_params"):
            if key in call_kwargs:
                call_kwargs[key] = None
        hidden.append(state.to(store))
        args.append(tuple(_to(a, device) for a in call_args))
        kwargs.append({k: _to(v, device) for k, v in call_kwargs.items()})
        raise _Captured

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for first in range(0, windows.shape[0], batch_size):
            with contextlib.suppress(_Captured):
                model(input_ids=windows[first : first + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return BlockInputs(hidden, args, kwargs, store)


def model_fingerprint(model) -> str:
    """Identity of the weights: config plus a float64 checksum of every parameter (cheap, order-aware).
    Where the model was loaded from is no part of it: the same weights moved elsewhere share caches."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)
    checksums = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().double().flatten()
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) % 7 + 1
            checksums.append(f"{name}:{flat.sum().item():.10e}:{(flat * weights).sum().item():.10e}")
    return key_digest({"config": config, "parameters": checksums}, length=20)


def prunable_linears(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the decoder blocks, by full module name (embeddings and lm_head excluded)."""
    prefix, blocks = find_blocks(model)
    return {
        f"{prefix}.{index}.{name}": linear
        for index, block in enumerate(blocks)
        for name, linear in block_linears(block).items()
    }
