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


def new_accumulators(linear: torch.nn.Linear, names: tuple[str, ...]) -> list:
    """Empty accumulators for the hooked statistics among ``names``, sized for ``linear``'s input."""
    device = linear.weight.device
    return [HOOKED_STATS[n](linear.in_features, device) for n in names if n in HOOKED_STATS]


class BlockStats:
    """The accumulators of every linear of one block, fed by forward hooks. Linears called with the very
    same input tensor (q/k/v, gate/up) have identical statistics, so the first of them accumulates and the
    others get a copy at the end: in a LLaMA block 3 of 7 accumulations instead of 7."""

    def __init__(self, linears: dict[str, torch.nn.Linear], names: tuple[str, ...]):
        self.names = tuple(n for n in names if n in HOOKED_STATS)
        self.owner: dict[str, str] = {}  # linear -> the linear whose accumulators hold its statistics
        self.accumulators: dict[str, list] = {}
        self._inputs_seen: list[tuple[torch.Tensor, str]] = []  # until every linear has an owner
        self.linears = linears
        self.handles = [
            linear.register_forward_hook(self._hook_for(name)) for name, linear in linears.items()
        ] if self.names else []  # fmt: skip

    def _hook_for(self, name: str):
        def hook(module, inputs, _output):
            x = inputs[0].detach()
            if name not in self.owner:
                shared = next((owner for seen, owner in self._inputs_seen if seen is inputs[0]), None)
                self.owner[name] = shared or name
                if shared is None:
                    self.accumulators[name] = new_accumulators(module, self.names)
                    self._inputs_seen.append((inputs[0], name))
                if len(self.owner) == len(self.linears):
                    self._inputs_seen.clear()  # identities are settled; drop the references
            if self.owner[name] == name:
                for accumulator in self.accumulators[name]:
                    accumulator.update(x)

        return hook

    def finalize(self) -> dict[str, dict[str, torch.Tensor]]:
        """Statistics per linear name (copies for the linears that shared, so callers may not alias)."""
        for handle in self.handles:
            handle.remove()
        self._inputs_seen.clear()
        own = {name: {a.name: a.finalize() for a in accs} for name, accs in self.accumulators.items()}
        stats = {}
        for name, linear in self.linears.items():
            owner = self.owner.get(name)
            if owner is None:  # never called by the block: empty accumulators, as if it saw no tokens
                stats[name] = {a.name: a.finalize() for a in new_accumulators(linear, self.names)}
            elif owner == name:
                stats[name] = own[name]
            else:
                stats[name] = {k: v.clone() for k, v in own[owner].items()}
        return stats
