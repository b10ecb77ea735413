"""Cost of APT against SparseGPT on the same layers, at each setting; the ratio is APT's time over
SparseGPT's (best of ``--rounds``, the solvers interleaved so machine noise hits all), with each solver's
layer-output error relative to SparseGPT's. #16's target: ratio <= 2.5 at 2:4 and 50%. ``apt_pass``
is APT's span-by-span mask pass alone (``apt_select``, before its joint update of the kept weights).

``--layers synthetic`` (default): the default model's layer shapes (576 x 576, 192 x 576, 1536 x 576
and 576 x 1536 in, one of each), random weights, one correlated Hessian per input size.
``--layers real``: the default model's own q, k, o, up and down projections of blocks 3, 15 and 27 with
their calibration Hessians (the fitness statistics: computed once, then read from the cache).
"""

from __future__ import annotations

import time

import torch
from common import evaluator_parser, evaluator_settings, report

from pruning_core.errors import UsageError
from pruning_core.masks import parse_settings, setting_spec
from pruning_core.scorers.apt import apt_prune, apt_select
from pruning_core.scorers.sparsegpt import sparsegpt_prune

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))  # (out, in): attention, k/v, up, down
REAL_BLOCKS = (3, 15, 27)
REAL_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def layer(rows: int, cols: int, tokens: int, seed: int):
    """W and H = 2/n X^T X of calibration inputs X (tokens x cols) with correlated features."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen) / cols**0.5 + 0.3 * torch.eye(cols)
    x = torch.randn(tokens, cols, generator=gen) @ mixing
    return torch.randn(rows, cols, generator=gen) / cols**0.5, 2.0 / tokens * x.T @ x


def real_layers(args) -> list:
    from fitness.setup import prepare_shipment

    shipment = prepare_shipment(evaluator_settings(args))
    modules = dict(shipment.model.named_modules())
    names = [f"model.layers.{block}.{linear}" for block in REAL_BLOCKS for linear in REAL_LINEARS]
    return [
        (
            modules[name].weight.detach().float(),
            shipment.stats[f"{shipment.hessian_of[name]}/hessian"].float(),
        )
        for name in names
    ]


def output_error(weight, new_weight, hessian) -> float:
    """|X (W - W')^T| up to a constant factor, from H = 2/n X^T X."""
    difference = (weight - new_weight).double()
    return float(((difference @ hessian.double()) * difference).sum()) ** 0.5


def main() -> None:
    p = evaluator_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--settings", default="2:4,0.5,4:8,0.7")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:  # before the layers load: a typo fails at once
        labels = parse_settings(args.settings)
    except UsageError as err:
        p.error(str(err))
    torch.set_num_threads(args.threads)
    if args.layers == "real":
        layers = real_layers(args)
    else:
        layers = [layer(rows, cols, 2048, seed) for seed, (rows, cols) in enumerate(SHAPES)]
    result = {"threads": args.threads, "rounds": args.rounds, "layers": args.layers, "settings": {}}
    for label in labels:
        spec = setting_spec(label, "matrix")  # both solvers' official group
        solvers = {"sparsegpt": sparsegpt_prune, "apt": apt_prune, "apt_pass": apt_select}
        best = dict.fromkeys(solvers, float("inf"))
        errors = {}
        for _ in range(args.rounds):
            for name, solve in solvers.items():
                began = time.perf_counter()
                pruned = [solve(w, h, spec)[0] for w, h in layers]
                best[name] = min(best[name], time.perf_counter() - began)
                errors[name] = sum(output_error(w, new, h) ** 2 for (w, h), new in zip(layers, pruned))
        result["settings"][label] = {
            "sparsegpt_s": round(best["sparsegpt"], 3),
            "apt_s": round(best["apt"], 3),
            "ratio": round(best["apt"] / best["sparsegpt"], 3),
            "apt_error_over_sparsegpt": round((errors["apt"] / errors["sparsegpt"]) ** 0.5, 4),
            "apt_pass_s": round(best["apt_pass"], 3),
            "apt_pass_ratio": round(best["apt_pass"] / best["sparsegpt"], 3),
            "apt_pass_error_over_sparsegpt": round((errors["apt_pass"] / errors["sparsegpt"]) ** 0.5, 4),
        }
    report(result, args.json)


if __name__ == "__main__":
    main()
