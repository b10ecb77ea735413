"""A straightforward reference of layer-wise pruning, as the original Wanda/SparseGPT scripts do it:
one calibration sample per forward, hooks on the block's layers, the block replayed sample by sample.
Used only to time the project's driver against it (same numerics, simpler loop)."""

from __future__ import annotations

import time

import torch

from pruning_core.blocks import block_linears, capture_inputs, find_blocks
from pruning_core.sequential import prune_weight
from pruning_core.stats import new_accumulators


class LayerStats:
    """The accumulators one nn.Linear needs, fed by a forward hook on its input (one hook per linear,
    where the project's driver shares one accumulation among linears that read the same input)."""

    def __init__(self, linear: torch.nn.Linear, names: tuple[str, ...]):
        self.accumulators = new_accumulators(linear, names)
        self.handle = linear.register_forward_hook(self._hook) if self.accumulators else None

    def _hook(self, _module, inputs, _output):
        for acc in self.accumulators:
            acc.update(inputs[0].detach())

    def finalize(self) -> dict[str, torch.Tensor]:
        if self.handle is not None:
            self.handle.remove()
        return {acc.name: acc.finalize() for acc in self.accumulators}


@torch.no_grad()
def reference_prune(model, scorer, spec, windows) -> float:
    """Prune ``model`` in place with batch-1 forwards everywhere; return the wall time in seconds."""
    start = time.perf_counter()
    _, blocks = find_blocks(model)
    device = next(model.parameters()).device
    inputs = capture_inputs(model, blocks[0], windows, batch_size=1, offload=False)
    for block in blocks:
        linears = block_linears(block)
        collectors = {name: LayerStats(linear, tuple(scorer.stats)) for name, linear in linears.items()}
        inputs.run(block, device, keep_outputs=False)
        for name, linear in linears.items():
            stats = collectors[name].finalize()
            linear.weight.data.copy_(prune_weight(scorer, linear.weight.data, stats, spec))
        inputs.run(block, device, keep_outputs=True)
    return time.perf_counter() - start
