"""Cost of the formula pipeline the GP pays per candidate, on random GP trees (depth <= 6):

canonicalize: constant folding + SymPy + rank canonicalization + printing the key (first time a tree
              is seen; the GP's repeats hit the cache)
compile:      canonical tree -> torch schedule
score:        one candidate over every nn.Linear of the model's decoder blocks (lm_head is not
              pruned); statistics are synthetic with the layers' shapes (X > 0, SPD Hessian, G > 0),
              and [H^-1]_jj is passed precomputed as stats["H"], as a fitness cache would hold it
              (its one-off cost per layer is reported separately)
collapse:     share of trees whose canonical key was already produced by an earlier tree
"""

from __future__ import annotations

import random
import statistics
import time

import torch
from common import parser, report
from deap import gp

from primitives.canonical import canonical_form
from primitives.compile import CompiledFormula
from primitives.pset import deap_to_tree, make_pset
from pruning_core.blocks import prunable_linears
from pruning_core.linalg import inverse_hessian_diag


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "mean_ms": 1e3 * statistics.fmean(ordered),
        "median_ms": 1e3 * statistics.median(ordered),
        "p95_ms": 1e3 * ordered[int(0.95 * (len(ordered) - 1))],
        "max_ms": 1e3 * ordered[-1],
        "total_s": sum(ordered),
    }


def random_trees(count: int, depth: int, seed: int) -> list:
    random.seed(seed)
    pset = make_pset()
    return [deap_to_tree(gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, depth))) for _ in range(count)]


def canonicalize_all(trees: list, group: str) -> tuple[list, dict]:
    canonical_s, compile_s, compiled, seen = [], [], [], {}
    collapsed = 0
    for tree in trees:
        start = time.perf_counter()
        key, canonical = canonical_form(tree, group)
        middle = time.perf_counter()
        if key in seen:
            collapsed += 1
        else:
            seen[key] = CompiledFormula(key, canonical)
            compiled.append(seen[key])
        compile_s.append(time.perf_counter() - middle)
        canonical_s.append(middle - start)
    stats = {
        "trees": len(trees),
        "distinct_trees": len(set(trees)),
        "distinct_keys": len(seen),
        "collapse_fraction": collapsed / len(trees),
        "constant_key_fraction": sum(canonical_form(t, group)[0] == "0" for t in trees) / len(trees),
        "canonicalize": summary(canonical_s),
        "compile": summary(compile_s),
    }
    return compiled, stats


def synthetic_stats(linears, device, seed: int) -> tuple[list[dict], dict]:
    """Stats of the right shapes, one Hessian per input width (shared, to save memory); returns them
    and the seconds inverse_hessian_diag takes per width."""
    gen = torch.Generator().manual_seed(seed)
    hessians, hinv, hinv_s, out = {}, {}, {}, []
    for linear in linears:
        columns = linear.in_features
        if columns not in hessians:
            inputs = torch.randn(columns, 2 * columns, generator=gen)
            hessians[columns] = (2.0 / inputs.shape[1] * inputs @ inputs.T).to(device)
            start = time.perf_counter()
            hinv[columns] = inverse_hessian_diag(hessians[columns])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            hinv_s[columns] = time.perf_counter() - start
        stats = {
            "X": (torch.rand(columns, generator=gen) + 0.1).to(device),
            "G": (torch.rand(linear.out_features, columns, generator=gen) * 1e-3 + 1e-6).to(device),
            "hessian": hessians[columns],
            "H": hinv[columns],
        }
        out.append(stats)
    return out, hinv_s


@torch.no_grad()
def score_all(candidates, linears, stats, device) -> list[float]:
    seconds = []
    for compiled in candidates:
        start = time.perf_counter()
        for linear, layer_stats in zip(linears, stats):
            compiled(linear.weight, layer_stats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def main():
    p = parser(__doc__)
    p.add_argument("--trees", type=int, default=1000)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--group", default="row")
    p.add_argument("--candidates", type=int, default=20, help="distinct candidates scored on the model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    compiled, result = canonicalize_all(random_trees(args.trees, args.depth, args.seed), args.group)
    result.update(depth=args.depth, group=args.group, torch_threads=torch.get_num_threads())

    from pruning_core.models import load_model

    model, _ = load_model(args.model, args.dtype, args.device)
    device = next(model.parameters()).device
    linears = list(prunable_linears(model).values())
    stats, hinv_s = synthetic_stats(linears, device, args.seed)
    widths = [m.in_features for m in linears]
    score_all(compiled[:2], linears, stats, device)  # warm-up
    seconds = score_all(compiled[: args.candidates], linears, stats, device)
    result.update(
        model=args.model,
        device=str(device),
        weight_dtype=str(next(model.parameters()).dtype),
        linears=len(linears),
        weights=sum(m.weight.numel() for m in linears),
        candidates_scored=len(seconds),
        score_all_linears_s=summary(seconds) | {"mean_s": statistics.fmean(seconds)},
        inverse_hessian_diag_s_per_width={str(w): t for w, t in hinv_s.items()},
        inverse_hessian_diag_all_linears_s=sum(hinv_s[w] for w in widths),  # once per layer per run
    )
    report(result, args.json)


if __name__ == "__main__":
    main()
