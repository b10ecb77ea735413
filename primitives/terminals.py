"""The formula terminals: tensors aligned with a layer's weight W (out x in), built from the pruning
core's statistics. Per-column statistics have shape (1, in) and broadcast over rows.

  W  signed weight
  X  ||X_j||_2 over calibration tokens (stat "X")
  G  per-weight gradient magnitude (stat "G")
  H  [H^-1]_jj of the damped Hessian (stat "hessian"), the quantity OBS / SparseGPT divide by
  U  |W_ij| / [H^-1]_jj, the size of the OBS compensating update implied by removing W_ij

A caller that scores many formulas on one layer may put ``inverse_hessian_diag(hessian)`` into the
stats dict under "H" to skip recomputing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch

from primitives import kernels
from pruning_core.errors import UsageError
from pruning_core.linalg import inverse_hessian_diag


@dataclass(frozen=True)
class Terminal:
    name: str
    stat: str | None  # pruning-core statistic it needs
    doc: str


TERMINALS: dict[str, Terminal] = {
    t.name: t
    for t in (
        Terminal("W", None, "signed weight"),
        Terminal("X", "X", "||X_j||_2 per input column"),
        Terminal("G", "G", "per-weight gradient magnitude"),
        Terminal("H", "hessian", "[H^-1]_jj per input column"),
        Terminal("U", "hessian", "|W_ij| / [H^-1]_jj"),
    )
}

# Assumptions SymPy may use. X and G are norms and H a diagonal of an SPD inverse, so positive; W is
# taken as nonzero like every denominator in ideal math (the protected div covers the zeros), which
# keeps quotients such as G / W finite and lets SymPy fold log(exp(G / W)).
SYMBOLS: dict[str, sympy.Symbol] = {
    "W": sympy.Symbol("W", real=True, nonzero=True),
    "X": sympy.Symbol("X", positive=True),
    "G": sympy.Symbol("G", positive=True),
    "H": sympy.Symbol("H", positive=True),
}
# U is defined through W and H, so U * H simplifies to |W|.
SYMPY_TERMINALS: dict[str, sympy.Expr] = {**SYMBOLS, "U": sympy.Abs(SYMBOLS["W"]) / SYMBOLS["H"]}


def stats_needed(names) -> tuple[str, ...]:
    """Pruning-core statistic names for a set of terminal names, in the core's order."""
    wanted = {TERMINALS[n].stat for n in names} - {None}
    return tuple(s for s in ("X", "hessian", "G") if s in wanted)


def _stat(stats: dict, key: str, terminal: str) -> torch.Tensor:
    if key not in stats:
        raise UsageError(
            f"the formula uses {terminal} but the stats lack {key!r}; collect {key!r} for this scorer"
        )
    return stats[key]


def _column(values: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    """Per-column values as (..., 1, in), broadcasting over the rows of weight (..., out, in)."""
    batch, cols = weight.shape[:-2], weight.shape[-1]
    if values.shape[-1] != cols or values.numel() != cols * math.prod(batch):
        raise ValueError(f"{name} has {values.numel()} entries, weight has {weight.shape[-1]} input columns")
    return values.to(device=weight.device, dtype=torch.float32).reshape(*batch, 1, cols)


def _hinv_diag(weight: torch.Tensor, stats: dict) -> torch.Tensor:
    if "H" in stats:
        return _column(stats["H"], weight, "H")
    hessian = _stat(stats, "hessian", "H or U").to(weight.device)
    return _column(inverse_hessian_diag(hessian), weight, "H")


def terminal_tensor(name: str, weight: torch.Tensor, stats: dict) -> torch.Tensor:
    """Float32 tensor of terminal ``name`` on the weight's device, (out, in) or (1, in)."""
    w = weight.float()
    if name == "W":
        return w
    if name == "X":
        return _column(_stat(stats, "X", "X"), weight, "X")
    if name == "G":
        g = _stat(stats, "G", "G")
        if tuple(g.shape) != tuple(weight.shape):
            raise ValueError(f"G has shape {tuple(g.shape)}, weight has {tuple(weight.shape)}")
        return g.to(device=weight.device, dtype=torch.float32)
    if name == "H":
        return _hinv_diag(weight, stats)
    if name == "U":
        return kernels.k_div(w.abs(), _hinv_diag(weight, stats))
    raise KeyError(name)
