"""How much does a k-window fitness estimate move, read from k contiguous windows or k spread ones?

Formulas and Wanda prune fresh copies of the model one-shot (as the search's rungs) at one setting and
are measured on every window of the fitness corpus. Per formula, d_i = per-window log(ppl / Wanda's
ppl); the whole corpus gives the "true" ratio exp(mean d). For each k: the spread (sd) of the k-window
mean over every contiguous block (how the search read windows before `--window-order spread`) and over
every phase of k evenly spaced windows (spread), the iid value sd(d) / sqrt(k), and how often each
way of reading gets the sign of the whole-corpus difference right. Also the lag-1 autocorrelation of d
and the ratio on exactly the windows a search with `--window-order first` / `spread` reads.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from common import parser, report


def block_means(d: np.ndarray, k: int) -> np.ndarray:
    """Means of every contiguous block of k windows (all starting points)."""
    sums = np.convolve(d, np.ones(k), mode="valid")
    return sums / k


def spread_means(d: np.ndarray, k: int) -> np.ndarray:
    """Means of k evenly spaced windows, for every phase of the stride."""
    stride = len(d) // k
    return np.array([d[phase : phase + stride * k : stride].mean() for phase in range(stride)])


def main() -> None:
    from fitness.windows import search_windows
    from metric_search.final import paired_log_ratios
    from primitives.scorer import FormulaScorer
    from pruning_core.data import corpus_tokens
    from pruning_core.masks import setting_spec
    from pruning_core.models import cache_dir, load_model
    from pruning_core.perplexity import make_windows, window_nlls
    from pruning_core.pruning import Calibration, calibrate_and_prune
    from pruning_core.scorers import get_scorer

    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--formulas", default="sqrt(X) * abs(W);X^0.6666666666666666 * colnorm(rownorm(abs(W) / H))"
    )
    p.add_argument("--setting", default="2:4", help="a sparsity (0.5) or an N:M pattern (2:4)")
    p.add_argument("--data", default="wikitext2-valid", help="the fitness corpus")
    p.add_argument("--nsamples", type=int, default=16, help="C4 calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration and fitness window length")
    p.add_argument("--windows", type=int, default=None, help="only the first N windows (default: all)")
    p.add_argument("--ks", default="2,8,16", help="window counts to compare")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = setting_spec(args.setting)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    windows = make_windows(corpus_tokens(tokenizer, args.data, args.data_dir), args.seqlen, args.windows)
    calib_tokens = corpus_tokens(tokenizer, "c4", args.data_dir)
    calibration = Calibration("c4", args.nsamples, args.seqlen, 0, sequential=False)
    scorers = {"wanda": get_scorer("wanda")}
    scorers.update({text: FormulaScorer(text, group=spec.group) for text in args.formulas.split(";")})
    nlls = {}
    for name, scorer in scorers.items():
        model, _ = load_model(args.model, args.dtype, args.device)
        calibrate_and_prune(
            model, scorer, spec, calib_tokens, calibration, cache_root=cache_dir(None), progress=False,
        )  # fmt: skip
        nlls[name] = window_nlls(model, windows, progress=True).numpy()
        del model
    tokens = windows.shape[1] - 1
    total = windows.shape[0]
    result: dict = {"setting": args.setting, "data": args.data, "windows": total, "seqlen": args.seqlen}
    for name in list(scorers)[1:]:
        d = paired_log_ratios({"s": nlls[name]}, {"s": nlls["wanda"]}, tokens)
        truth = d.mean()
        row = {
            "ratio_all": math.exp(truth),
            "sd_per_window": float(d.std(ddof=1)),
            "lag1_autocorrelation": float(np.corrcoef(d[:-1], d[1:])[0, 1]),
        }
        for k in (int(text) for text in args.ks.split(",")):
            blocks, spread = block_means(d, k), spread_means(d, k)
            row[f"k{k}"] = {
                "sd_contiguous": float(blocks.std()),
                "sd_spread": float(spread.std()),
                "sd_iid": float(d.std(ddof=1) / math.sqrt(k)),
                "sign_right_contiguous": float(np.mean(np.sign(blocks) == np.sign(truth))),
                "sign_right_spread": float(np.mean(np.sign(spread) == np.sign(truth))),
                "ratio_first_k": math.exp(d[:k].mean()),
                "ratio_search_spread_k": math.exp(d[search_windows(total, k)].mean()),
            }
        result[name] = row
    report(result, args.json)


if __name__ == "__main__":
    main()
