"""Per-candidate time of a fitness evaluation (score + mask every linear in place, perplexity, restore)
vs a bare forward over the same fitness tokens in the same process, and peak RSS vs model bytes.
Target: evaluation / bare <= 1.25 on CPU with smollm2-135m."""

from __future__ import annotations

import time

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
    args = p.parse_args()

    from fitness.setup import build_evaluator

    evaluator = build_evaluator(evaluator_settings(args), progress=not args.json)
    rss_before_eval = peak_rss_mb()
    evaluator.evaluate_text(args.formula)  # warm-up: compile cache, allocator
    evaluate, bare = [], []
    for _ in range(args.rounds):  # interleaved, best of each, so outside load hits both alike
        evaluate.append(evaluator.evaluate_text(args.formula)["seconds"])
        bare.append(bare_forward_seconds(evaluator.model, evaluator.windows_for("ppl")))
    model_mb = sum(p.numel() * p.element_size() for p in evaluator.model.parameters()) / 2**20
    result = {
        "model": args.model,
        "device": str(next(evaluator.model.parameters()).device),
        "fitness_tokens": int(evaluator.windows_for("ppl").numel()),
        "evaluate_s": min(evaluate),
        "bare_forward_s": min(bare),
        "ratio": min(evaluate) / min(bare),
        "target": "<= 1.25",
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
