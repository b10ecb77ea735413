"""The sequential layer-wise driver: the one layer loop of the project.

For each decoder block in order: forward hooks on its linears accumulate the statistics the scorer
declares, the linears are pruned, and the block is re-run so that the next block calibrates on the
outputs of the pruned prefix (SparseGPT/Wanda). ``Walk(sequential=False)`` keeps the dense outputs instead
(one-shot statistics of the dense model, as the fitness evaluator uses). ``Walk(one_pass=True)`` runs each
block once over all windows and prunes every linear as its input arrives, so a linear's statistics come from
the linears pruned before it in the block too (GPTQ's "true sequential" order), at one pass per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm.auto import tqdm

from pruning_core.blocks import block_linears, capture_inputs, find_blocks
from pruning_core.errors import UsageError
from pruning_core.masks import keep_mask
from pruning_core.scorers.base import SparsitySpec


def keep_of(scorer, weight: torch.Tensor, stats: dict, spec: SparsitySpec) -> torch.Tensor:
    """The keep-mask ``scorer`` chooses for ``weight`` (a solver's mask is its nonzero pattern)."""
    if hasattr(scorer, "prune"):
        return scorer.prune(weight.float(), stats, spec) != 0
    scores = scorer.score(weight.float(), stats)
    if scores.shape != weight.shape:
        raise UsageError(
            f"scorer {scorer.name!r} returned shape {tuple(scores.shape)} for {tuple(weight.shape)}"
        )
    if not torch.isfinite(scores).all():
        raise UsageError(f"scorer {scorer.name!r} produced NaN/inf scores; fix the formula or the statistics")
    return keep_mask(scores, spec)


def prune_weight(scorer, weight: torch.Tensor, stats: dict, spec: SparsitySpec) -> torch.Tensor:
    """The pruned (and for solvers, updated) weight in float32; pure: ``weight`` is not modified."""
    if hasattr(scorer, "prune"):
        return scorer.prune(weight.float(), stats, spec)
    return weight.float() * keep_of(scorer, weight, stats, spec)


@dataclass(frozen=True)
class Walk:
    """How calibration windows pass through the decoder blocks."""

    sequential: bool = True  # each block calibrates on the outputs of the pruned blocks before it
    batch_size: int = 8  # windows per forward pass
    offload: bool = False  # keep the activations between blocks on CPU
    progress: bool = True
    # sequential only: each block runs once, over all windows in one batch (batch_size is not used), and
    # each linear is pruned from the input it receives (after the linears before it in the block)
    one_pass: bool = False


DEFAULT_WALK = Walk()


@dataclass
class BlockVisit:
    """What a visitor sees of one block: its index, full name, linears and their statistics."""

    index: int
    name: str
    linears: dict
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def walk_blocks(
    model,
    windows: torch.Tensor,
    stat_names: tuple[str, ...],
    visit,
    walk: Walk = DEFAULT_WALK,
    desc: str = "blocks",
) -> None:
    """Calibrate block by block and call ``visit(BlockVisit)`` between statistics and propagation."""
    from pruning_core.stats import HOOKED_STATS, BlockStats

    prefix, blocks = find_blocks(model)
    device = next(model.parameters()).device
    bar = tqdm(blocks, desc=desc, unit="block", disable=not walk.progress, leave=False)
    if not set(stat_names) & set(HOOKED_STATS):  # nothing to calibrate: skip the forward passes
        for index, block in enumerate(bar):
            linears = block_linears(block)
            visit(BlockVisit(index, f"{prefix}.{index}", linears, {name: {} for name in linears}))
        return
    if walk.sequential and walk.one_pass:
        _walk_one_pass(model, windows, stat_names, visit, walk.offload, (prefix, blocks, bar))
        return
    inputs = capture_inputs(model, blocks[0], windows, walk.batch_size, walk.offload)
    for index, block in enumerate(bar):
        linears = block_linears(block)
        collector = BlockStats(linears, stat_names)
        last = index == len(blocks) - 1
        inputs.run(block, device, keep_outputs=not walk.sequential and not last)
        stats = collector.finalize()
        visit(BlockVisit(index, f"{prefix}.{index}", linears, stats))
        if walk.sequential and not last:
            inputs.run(block, device, keep_outputs=True)


def _walk_one_pass(model, windows, stat_names, visit, offload: bool, found) -> None:
    """Each block once over every window; a pre-hook on each linear computes its statistics from the input
    it receives and calls ``visit`` for that linear alone, before the linear runs. ``found``: the blocks'
    prefix, the blocks and the progress bar over them."""
    from pruning_core.stats import new_accumulators

    prefix, blocks, bar = found
    device = next(model.parameters()).device
    inputs = capture_inputs(model, blocks[0], windows, windows.shape[0], offload)

    def on_input(index: int, name: str, seen: list, linear, args) -> None:
        x = args[0]
        stats = next((stats for tensor, stats in seen if tensor is x), None)
        if stats is None:  # q/k/v (gate/up) receive the very same tensor: its statistics once
            accumulators = new_accumulators(linear, stat_names)
            for accumulator in accumulators:
                accumulator.update(x.detach())
            stats = {accumulator.name: accumulator.finalize() for accumulator in accumulators}
            seen.append((x, stats))  # holding x also keeps its identity from being reused in the block
        visit(BlockVisit(index, f"{prefix}.{index}", {name: linear}, {name: stats}))

    for index, block in enumerate(bar):
        seen: list = []
        handles = [
            linear.register_forward_pre_hook(partial(on_input, index, name, seen))
            for name, linear in block_linears(block).items()
        ]
        try:
            inputs.run(block, device, keep_outputs=index < len(blocks) - 1)
        finally:
            for handle in handles:
                handle.remove()


def prune_model(
    model,
    scorer,
    spec: SparsitySpec,
    windows: torch.Tensor,
    *,
    gradients: dict[str, torch.Tensor] | None = None,
    block_sparsities: list[float] | None = None,
    walk: Walk = DEFAULT_WALK,
) -> dict:
    """Prune every linear of every decoder block in place; return per-linear sparsity."""
    if "G" in scorer.stats and gradients is None:
        raise ValueError("this scorer needs gradients: pass gradients=gradient_magnitudes(...)")
    per_linear: dict[str, float] = {}

    def prune_block(visit: BlockVisit) -> None:
        block_spec = spec
        if block_sparsities is not None and not spec.is_nm:
            block_spec = spec.with_sparsity(block_sparsities[visit.index])
        for name, linear in visit.linears.items():
            full_name = f"{visit.name}.{name}"
            stats = dict(visit.stats[name])
            if gradients is not None and "G" in scorer.stats:
                stats["G"] = gradients[full_name].to(linear.weight.device)
            new_weight = prune_weight(scorer, linear.weight.data, stats, block_spec)
            linear.weight.data.copy_(new_weight.to(linear.weight.dtype))
            per_linear[full_name] = (linear.weight.data == 0).float().mean().item()

    walk_blocks(model, windows, tuple(scorer.stats), prune_block, walk, desc=f"prune {scorer.name}")
    return per_linear


def measured_sparsity(model) -> float:
    """Share of exact zeros over all prunable linear weights."""
    _, blocks = find_blocks(model)
    zeros = total = 0
    for block in blocks:
        for linear in block_linears(block).values():
            zeros += int((linear.weight == 0).sum())
            total += linear.weight.numel()
    return zeros / max(total, 1)
