"""Calibration statistics as accumulators (fed by forward hooks) plus pure finalize functions."""

from __future__ import annotations

import torch


class ColumnNorm:
    """||X_j||_2 over all calibration tokens: sqrt of the running sum of x_j^2 per input channel."""

    name = "X"

    def __init__(self, columns: int, device):
        self.sum_sq = torch.zeros(columns, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_sq += (x * x).sum(dim=0)

    def finalize(self) -> torch.Tensor:
        return self.sum_sq.sqrt()


class Hessian:
    """2/n * X X^T over the n calibration tokens (the layer-wise reconstruction Hessian)."""

    name = "hessian"

    def __init__(self, columns: int, device):
        self.sum_outer = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_outer.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def finalize(self) -> torch.Tensor:
        return self.sum_outer * (2.0 / max(self.tokens, 1))


# Statistics gathered by hooks on a layer's input; "G" comes from backward passes (gradients.py).
HOOKED_STATS = {"X": ColumnNorm, "hessian": Hessian}


class LayerStats:
    """The accumulators one nn.Linear needs, fed by a forward hook on its input."""

    def __init__(self, linear: torch.nn.Linear, names: tuple[str, ...]):
        device = linear.weight.device
        self.accumulators = [HOOKED_STATS[n](linear.in_features, device) for n in names if n in HOOKED_STATS]
        self.handle = linear.register_forward_hook(self._hook) if self.accumulators else None

    def _hook(self, _module, inputs, _output):
        for acc in self.accumulators:
            acc.update(inputs[0].detach())

    def finalize(self) -> dict[str, torch.Tensor]:
        if self.handle is not None:
            self.handle.remove()
        return {acc.name: acc.finalize() for acc in self.accumulators}
