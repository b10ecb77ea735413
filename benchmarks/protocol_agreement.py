"""Do cheap pruning protocols rank formulas as the sequential driver does, and how noisy is a window?

Each formula and Wanda prune fresh copies of the model at one setting under several protocols —
`one-shot` (every linear from the dense model's statistics, as the search's lower rungs),
`sequential:N` (the core's sequential driver on N calibration windows, as a user prunes), `one-pass:N`
(that driver at one pass per block: `prune --one-pass`) and `anchored` (every linear one-shot from the
statistics the sequential driver records while Wanda prunes, i.e. from a pruned prefix computed once) —
and are measured on the same fitness windows. Per protocol and formula: the ratio to Wanda (exp of the
mean per-window log-likelihood difference) on all windows, on the first ``--split`` windows (as a rung
with that many windows sees them) and on the rest, and the per-window standard deviation of the
difference (the noise of a rung with k windows is about sd / sqrt(k)). Spearman correlations compare
each protocol's ranking with the reference protocol's (the last one).
"""

from __future__ import annotations

import math
import time

import torch
from common import parser, report

DEFAULT_FORMULAS = (
    "sqrt(X) * abs(W)",
    "X^0.6666666666666666 * abs(W)",
    "X * abs(W) / H",
    "sqrt(X) * (2 * abs(W) + rownorm(1))",
    "X^0.6666666666666666 * colnorm(rownorm(abs(W) / H))",
)


def parse_protocol(text: str) -> tuple[str, int | None]:
    """'one-shot' -> ('one-shot', None); 'sequential:16' -> ('sequential', 16); 'anchored' likewise."""
    name, _, samples = text.partition(":")
    if name in ("one-shot", "anchored") and not samples:
        return name, None
    if name in ("sequential", "one-pass") and samples.isdigit() and int(samples) > 0:
        return name, int(samples)
    raise SystemExit(
        f"protocol {text!r}: use one-shot, anchored, sequential:N or one-pass:N (N calibration windows)"
    )


def anchored_stats(model, spec, windows) -> dict[str, dict]:
    """Per linear: the statistics the sequential driver records while Wanda prunes ``model`` in place
    (each block's inputs come from the Wanda-pruned blocks before it)."""
    from pruning_core.linalg import inverse_hessian_diag
    from pruning_core.scorers import get_scorer
    from pruning_core.sequential import Walk, prune_weight, walk_blocks

    wanda, recorded = get_scorer("wanda"), {}

    def record_and_prune(visit) -> None:
        for name, linear in visit.linears.items():
            stats = visit.stats[name]
            recorded[f"{visit.name}.{name}"] = {
                "X": stats["X"], "H": inverse_hessian_diag(stats["hessian"]), "hessian": stats["hessian"]
            }  # fmt: skip
            linear.weight.data.copy_(prune_weight(wanda, linear.weight.data, stats, spec))

    walk_blocks(model, windows, ("X", "hessian"), record_and_prune, Walk(progress=False))
    return recorded


def prune_with_recorded(model, scorer, spec, recorded: dict, gradients: dict) -> None:
    """Prune every linear from fixed recorded statistics (no forward pass)."""
    from pruning_core.blocks import prunable_linears
    from pruning_core.sequential import prune_weight

    for name, linear in prunable_linears(model).items():
        stats = {**recorded[name], "G": gradients[name]}
        linear.weight.data.copy_(prune_weight(scorer, linear.weight.data, stats, spec))


def main() -> None:
    from scipy.stats import spearmanr

    from metric_search.final import paired_log_ratios
    from primitives.scorer import FormulaScorer
    from pruning_core.data import corpus_tokens
    from pruning_core.masks import setting_spec
    from pruning_core.models import cache_dir, load_model
    from pruning_core.perplexity import make_windows, window_nlls
    from pruning_core.pruning import Calibration, calibrate_and_prune
    from pruning_core.scorers import get_scorer

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--formulas", default=";".join(DEFAULT_FORMULAS), help="';'-separated formulas")
    p.add_argument("--setting", default="2:4", help="a sparsity (0.5) or an N:M pattern (2:4)")
    p.add_argument("--protocols", default="one-shot,sequential:4,sequential:16")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of the one-shot protocol")
    p.add_argument("--seqlen", type=int, default=512, help="calibration and fitness window length")
    p.add_argument("--windows", type=int, default=32, help="fitness windows (WikiText-2 valid)")
    p.add_argument("--split", type=int, default=8, help="report the first SPLIT windows and the rest apart")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    protocols = [(text, *parse_protocol(text)) for text in args.protocols.split(",")]
    spec = setting_spec(args.setting)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    windows = make_windows(
        corpus_tokens(tokenizer, "wikitext2-valid", args.data_dir), args.seqlen, args.windows
    )
    calib_tokens = corpus_tokens(tokenizer, "c4", args.data_dir)
    scorers = {"wanda": get_scorer("wanda")}
    scorers.update({text: FormulaScorer(text, group=spec.group) for text in args.formulas.split(";")})
    tokens = windows.shape[1] - 1
    result: dict = {"setting": args.setting, "windows": int(windows.shape[0]), "split": args.split}
    ratios: dict[str, dict[str, float]] = {}
    for label, kind, samples in protocols:
        calibration = Calibration(
            "c4",
            samples or args.nsamples,
            args.seqlen,
            0,
            sequential=kind in ("sequential", "one-pass"),
            one_pass=kind == "one-pass",
        )
        nlls, seconds = {}, {}
        if kind == "anchored":
            from pruning_core.data import calibration_windows
            from pruning_core.gradients import gradient_magnitudes

            model, _ = load_model(args.model, args.dtype, args.device)
            calib = calibration_windows(calib_tokens, calibration.nsamples, args.seqlen, 0)
            gradients = gradient_magnitudes(model, calib, calibration.key(), cache_dir(None), False)
            recorded = anchored_stats(model, spec, calib)
        for name, scorer in scorers.items():
            started = time.perf_counter()
            model, _ = load_model(args.model, args.dtype, args.device)
            if kind == "anchored":
                prune_with_recorded(model, scorer, spec, recorded, gradients)
            else:
                calibrate_and_prune(
                    model, scorer, spec, calib_tokens, calibration, cache_root=cache_dir(None),
                    progress=False,
                )  # fmt: skip
            nlls[name] = window_nlls(model, windows).numpy()
            seconds[name] = time.perf_counter() - started
            del model
        rows = {}
        for name, nll in nlls.items():
            difference = paired_log_ratios({"s": nll}, {"s": nlls["wanda"]}, tokens)
            rows[name] = {
                "ppl": math.exp(nll.sum() / (tokens * len(nll))),
                "ratio": math.exp(difference.mean()),
                "ratio_first": math.exp(difference[: args.split].mean()),
                "ratio_rest": math.exp(difference[args.split :].mean()),
                "sd_per_window": float(difference.std(ddof=1)),
                "seconds": seconds[name],
            }
        result[label] = rows
        ratios[label] = {name: row["ratio"] for name, row in rows.items()}
    reference = protocols[-1][0]
    names = list(scorers)
    result["spearman_vs_" + reference] = {
        label: float(spearmanr([ratios[label][n] for n in names], [ratios[reference][n] for n in names])[0])
        for label, *_ in protocols[:-1]
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
