"""Per-candidate time of a fitness evaluation (score + mask every linear in place, perplexity, restore)
vs a bare forward over the same fitness tokens in the same process; the proxy's time vs that
evaluation's; and peak RSS vs model bytes. Targets on CPU with smollm2-135m: evaluation / bare
<= 1.10, proxy / evaluation <= 0.2, peak RSS / model bytes <= 2.5."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from common import evaluator_parser, evaluator_settings, peak_rss_mb, report


@torch.no_grad()
def bare_forward_seconds(model, windows) -> float:
    device = next(model.parameters()).device
    start = time.perf_counter()
    for window in windows:
        model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main():
    p = evaluator_parser(__doc__, nsamples=16, fitness_windows=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--formula", default="abs(W) * X")
    p.add_argument("--settings", default="0.5", help="sparsity settings, e.g. 0.5,2:4 (as the search)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (the CPU search uses 1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from fitness.setup import build_evaluator
    from pruning_core.masks import parse_settings

    settings = replace(evaluator_settings(args), patterns=parse_settings(args.settings))
    evaluator = build_evaluator(settings, progress=not args.json)
    rss_before_eval = peak_rss_mb()
    evaluator.evaluate_text(args.formula)  # warm-up: compile cache, allocator
    evaluate, bare, proxy = [], [], []
    windows = evaluator.windows_for("ppl")
    for _ in range(args.rounds):  # interleaved, best of each, so outside load hits all alike
        evaluate.append(evaluator.evaluate_text(args.formula)["seconds"])
        bare.append(sum(bare_forward_seconds(evaluator.model, windows) for _ in settings.patterns))
        proxy.append(evaluator.evaluate_text(args.formula, "proxy")["seconds"])
    model_mb = sum(p.numel() * p.element_size() for p in evaluator.model.parameters()) / 2**20
    result = {
        "model": args.model,
        "device": str(next(evaluator.model.parameters()).device),
        "fitness_tokens": int(evaluator.windows_for("ppl").numel()),
        "settings": list(settings.patterns),
        "threads": torch.get_num_threads(),
        "evaluate_s": min(evaluate),
        "bare_forward_s": min(bare),
        "ratio": min(evaluate) / min(bare),
        "proxy_s": min(proxy),
        "proxy_over_ppl": min(proxy) / min(evaluate),
        "target": "ratio <= 1.10, proxy_over_ppl <= 0.2, peak_rss_over_model <= 2.5",
        "model_mb": model_mb,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_before_candidates_mb": rss_before_eval,
        "peak_rss_over_model": peak_rss_mb() / model_mb,
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    report(result, args.json)


if __name__ == "__main__":
    main()
