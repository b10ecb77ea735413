"""Tokens/s of the CLI's perplexity evaluator vs a bare forward loop over the same windows.

The two are interleaved over several rounds and the best round of each is kept, so load from other
processes affects both alike. Target: evaluator / bare >= 0.95.
"""

from __future__ import annotations

import time

import torch
from common import parser, report

from pruning_core.data import load_rows, tokenize_corpus
from pruning_core.models import load_model
from pruning_core.perplexity import make_windows, perplexity


@torch.no_grad()
def bare_forward(model, windows, batch_size):
    device = next(model.parameters()).device
    start = time.perf_counter()
    for first in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[first : first + batch_size].to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main():
    p = parser(__doc__)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    windows = make_windows(
        tokenize_corpus(tokenizer, load_rows("wikitext2-test", args.data_dir)), args.seqlen, args.windows
    )
    tokens = windows.numel()
    bare_forward(model, windows[:1], 1)  # warm-up
    evaluator, bare = [], []
    for _ in range(args.rounds):
        evaluator.append(perplexity(model, windows, args.batch_size, progress=False)["seconds"])
        bare.append(bare_forward(model, windows, args.batch_size))
    result = {
        "model": args.model,
        "device": str(next(model.parameters()).device),
        "tokens": tokens,
        "evaluator_tokens_per_s": tokens / min(evaluator),
        "bare_tokens_per_s": tokens / min(bare),
        "ratio": min(bare) / min(evaluator),
        "target": ">= 0.95",
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
