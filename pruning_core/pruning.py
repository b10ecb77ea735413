"""One pruning run: calibration windows, gradients when the scorer needs them, optional OWL
block sparsities, then the sequential driver."""

from __future__ import annotations

import time

import torch

from pruning_core.data import calibration_windows
from pruning_core.scorers.base import SparsitySpec
from pruning_core.sequential import measured_sparsity, prune_model, walk_blocks


def owl_block_sparsities(model, windows, target: float, m: float, lam: float, **walk) -> list[float]:
    """OWL: each block's outlier ratio of |W| * ||X|| on the dense model, mapped around ``target``."""
    from pruning_core.owl import outlier_ratio, owl_sparsities

    ratios: list[float] = []

    def measure(visit) -> None:
        pairs = [(linear.weight.data, visit.stats[name]["X"]) for name, linear in visit.linears.items()]
        ratios.append(outlier_ratio(pairs, m=m))

    walk_blocks(model, windows, ("X",), measure, sequential=False, desc="owl ratios", **walk)
    return owl_sparsities(ratios, target, lam)


def calibrate_and_prune(
    model,
    scorer,
    spec: SparsitySpec,
    calib_tokens: torch.Tensor,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    calib_name: str,
    cache_root=None,
    owl: bool = False,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    sequential: bool = True,
    batch_size: int = 8,
    offload: bool = False,
    progress: bool = True,
) -> dict:
    """Prune ``model`` in place; return measured sparsity (overall, per linear) and timings."""
    started = time.perf_counter()
    windows = calibration_windows(calib_tokens, nsamples, seqlen, seed)
    gradients = None
    if "G" in scorer.stats:
        from pruning_core.gradients import gradient_magnitudes

        key = {"calib": calib_name, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
        gradients = gradient_magnitudes(model, windows, key, cache_root, progress)
    walk = {"batch_size": batch_size, "offload": offload, "progress": progress}
    block_sparsities = None
    if owl and not spec.is_nm:
        block_sparsities = owl_block_sparsities(model, windows, spec.sparsity, owl_m, owl_lambda, **walk)
    calibrated = time.perf_counter()
    per_linear = prune_model(
        model,
        scorer,
        spec,
        windows,
        gradients=gradients,
        block_sparsities=block_sparsities,
        sequential=sequential,
        **walk,
    )
    return {
        "sparsity": measured_sparsity(model),
        "per_linear": per_linear,
        "block_sparsities": block_sparsities,
        "seconds_calibration": calibrated - started,
        "seconds_prune": time.perf_counter() - calibrated,
    }
