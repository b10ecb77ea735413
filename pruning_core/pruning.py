"""One pruning run: calibration windows, gradients when the scorer needs them, optional OWL
block sparsities, then the sequential driver."""

from __future__ import annotations

import time
from dataclasses import KW_ONLY, dataclass, replace

import torch

from pruning_core.data import calibration_windows
from pruning_core.scorers.base import SparsitySpec
from pruning_core.sequential import DEFAULT_WALK, Walk, measured_sparsity, prune_model, walk_blocks


def owl_block_sparsities(
    model, windows, target: float, m: float, lam: float, walk: Walk = DEFAULT_WALK
) -> list[float]:
    """OWL: each block's outlier ratio of |W| * ||X|| on the dense model, mapped around ``target``."""
    from pruning_core.owl import outlier_ratio, owl_sparsities

    ratios: list[float] = []

    def measure(visit) -> None:
        pairs = [(linear.weight.data, visit.stats[name]["X"]) for name, linear in visit.linears.items()]
        ratios.append(outlier_ratio(pairs, m=m))

    walk_blocks(model, windows, ("X",), measure, replace(walk, sequential=False), desc="owl ratios")
    return owl_sparsities(ratios, target, lam)


@dataclass(frozen=True)
class Calibration:
    """Which tokens calibrate the pruning, and how they pass through the model."""

    data: str = "c4"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    _: KW_ONLY  # how the windows pass through the model: by name only, so a new field shifts nothing
    batch_size: int = 8  # windows per forward pass
    offload: bool = False  # keep the activations between blocks on CPU
    sequential: bool = True  # each block calibrates on the outputs of the pruned blocks before it
    one_pass: bool = False  # sequential: one pass per block, each linear pruned as its input arrives (Walk)

    def key(self) -> dict:
        """What the statistics depend on (the gradient cache's key)."""
        return {"calib": self.data, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}


@dataclass(frozen=True)
class Owl:
    """Outlier-weighted layer-wise sparsity: outliers are |W| * ||X|| above ``m`` times the layer mean;
    block sparsities span 2 * ``lam`` around the target."""

    m: float = 5.0
    lam: float = 0.08


def calibrate_and_prune(
    model,
    scorer,
    spec: SparsitySpec,
    calib_tokens: torch.Tensor,
    calibration: Calibration,
    *,
    owl: Owl | None = None,
    cache_root=None,
    progress: bool = True,
) -> dict:
    """Prune ``model`` in place; return measured sparsity (overall, per linear) and timings."""
    c = calibration
    started = time.perf_counter()
    windows = calibration_windows(calib_tokens, c.nsamples, c.seqlen, c.seed)
    gradients = None
    if "G" in scorer.stats:
        from pruning_core.gradients import gradient_magnitudes

        gradients = gradient_magnitudes(model, windows, c.key(), cache_root, progress)
    walk = Walk(c.sequential, c.batch_size, c.offload, progress, c.one_pass)
    block_sparsities = None
    if owl is not None and not spec.is_nm:
        block_sparsities = owl_block_sparsities(model, windows, spec.sparsity, owl.m, owl.lam, walk)
    calibrated = time.perf_counter()
    per_linear = prune_model(
        model, scorer, spec, windows, gradients=gradients, block_sparsities=block_sparsities, walk=walk
    )
    return {
        "sparsity": measured_sparsity(model),
        "per_linear": per_linear,
        "block_sparsities": block_sparsities,
        "seconds_calibration": calibrated - started,
        "seconds_prune": time.perf_counter() - calibrated,
    }
