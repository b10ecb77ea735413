"""Does the cheap proxy rank candidates like perplexity does? Spearman correlation between the proxy
(layer reconstruction error from cached Hessians, no forward pass) and fitness perplexity over random
trees plus the known metrics, and the cost ratio proxy / perplexity per candidate."""

from __future__ import annotations

import math
import random

from common import evaluator_parser, evaluator_settings, report


def random_formulas(count: int, seed: int, max_depth: int) -> list[str]:
    from deap import gp

    from primitives import canonical_key
    from primitives.pset import deap_to_text, make_pset

    pset = make_pset()
    random.seed(seed)
    seen, formulas = set(), []
    while len(formulas) < count:
        text = deap_to_text(gp.PrimitiveTree(gp.genHalfAndHalf(pset, min_=1, max_=max_depth)))
        try:
            key = canonical_key(text)
        except Exception:
            continue
        if key not in seen:
            seen.add(key)
            formulas.append(text)
    return formulas


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main():
    p = evaluator_parser(__doc__, nsamples=16, fitness_windows=4)
    p.add_argument("--random", type=int, default=44, help="random trees besides the known metrics")
    p.add_argument("--max-depth", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from fitness.setup import build_evaluator
    from primitives import KNOWN_FORMULAS

    evaluator = build_evaluator(evaluator_settings(args), progress=not args.json)
    candidates = list(KNOWN_FORMULAS.values()) + random_formulas(args.random, args.seed, args.max_depth)
    rows = []
    for text in candidates:
        proxy = evaluator.evaluate_text(text, "proxy")
        ppl = evaluator.evaluate_text(text, "ppl")
        rows.append(
            {
                "formula": text,
                "proxy": proxy["fitness"],
                "ppl": ppl["fitness"],
                "proxy_s": proxy["seconds"],
                "ppl_s": ppl["seconds"],
                "reason": ppl["reason"],
            }
        )
    valid = [r for r in rows if math.isfinite(r["proxy"]) and math.isfinite(r["ppl"])]
    result = {
        "model": args.model,
        "candidates": len(rows),
        "valid": len(valid),
        "spearman": spearman([r["proxy"] for r in valid], [r["ppl"] for r in valid]),
        "proxy_s_mean": sum(r["proxy_s"] for r in valid) / len(valid),
        "ppl_s_mean": sum(r["ppl_s"] for r in valid) / len(valid),
        "fitness_tokens": args.fitness_windows * args.fitness_seqlen,
        "rows": rows,
    }
    result["cost_ratio"] = result["proxy_s_mean"] / result["ppl_s_mean"]
    report(result, args.json)


if __name__ == "__main__":
    main()
