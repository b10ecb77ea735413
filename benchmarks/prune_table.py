"""Perplexity, prune time and peak RSS of every built-in scorer at several sparsities on one model,
each run in its own `python -m pruning_core prune --json` process; a markdown table under
benchmarks/results/. Also times the driver against a straightforward batch-1 reference loop."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

from common import parser, report

from pruning_core.errors import UsageError
from pruning_core.updates import split_update

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "50%": ["--sparsity", "0.5"],
    "2:4": ["--pattern", "2:4"],
    "4:8": ["--pattern", "4:8"],
    "60%": ["--sparsity", "0.6"],
    "70%": ["--sparsity", "0.7"],
    "70%+OWL": ["--sparsity", "0.7", "--owl"],
}


def cli(*args) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pruning_core", *args, "--json"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout)


def driver_vs_reference(args, scorer_name: str) -> dict:
    """Same scorer, same windows: the project's driver vs reference_loop (batch-1 forwards)."""
    from reference_loop import reference_prune

    from pruning_core.data import calibration_windows, load_rows, tokenize_corpus
    from pruning_core.models import load_model
    from pruning_core.scorers import SparsitySpec, get_scorer
    from pruning_core.sequential import Walk, prune_model

    model, tokenizer = load_model(args.model, args.dtype, args.device)
    windows = calibration_windows(
        tokenize_corpus(tokenizer, load_rows("c4", args.data_dir)), args.nsamples, args.seqlen, 0
    )
    scorer, spec = get_scorer(scorer_name), SparsitySpec(0.5, group="row")
    reference_model = copy.deepcopy(model)
    # warm-up on a throw-away copy, so neither timed loop pays the first call's one-time costs
    prune_model(copy.deepcopy(model), scorer, spec, windows[:2], walk=Walk(progress=False))
    start = time.perf_counter()
    prune_model(model, scorer, spec, windows, walk=Walk(progress=False))
    ours = time.perf_counter() - start
    theirs = reference_prune(reference_model, scorer, spec, windows)
    return {"driver_s": ours, "reference_s": theirs, "ratio": ours / theirs}


def main():
    p = parser(__doc__)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16, help="WikiText-2 test windows (0 = all)")
    p.add_argument(
        "--scorers",
        default="magnitude,wanda,sparsegpt,ria",
        help="names, each optionally +UPDATE: wanda+refit",
    )
    p.add_argument("--settings", default="50%,2:4,4:8")
    p.add_argument(
        "--timing-nsamples",
        type=int,
        default=16,
        help="calibration samples for the timing runs (0: skip them)",
    )
    p.add_argument(
        "--out", default=None, help="markdown file (default benchmarks/results/prune_table_<model>.md)"
    )
    args = p.parse_args()
    settings = [setting for setting in args.settings.split(",") if setting]
    try:  # before the dense evaluation: a typo fails at once, not after minutes of pruning
        cells = [
            (scorer, split_update(scorer), setting)
            for scorer in filter(None, args.scorers.split(","))
            for setting in settings
        ]
    except UsageError as err:
        p.error(f"--scorers: {err}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        p.error(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    base = ["--model", args.model, "--seqlen", str(args.seqlen)]
    if args.max_windows:
        base += ["--max-windows", str(args.max_windows)]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype), ("--data-dir", args.data_dir)):
        if value:
            base += [flag, value]
    dense = cli("eval", *base, "--data", "wikitext2-test")
    common = [
        *base,
        "--calib",
        "c4",
        "--nsamples",
        str(args.nsamples),
        "--seed",
        "0",
        "--eval",
        "wikitext2-test",
    ]
    rows = [
        {
            "scorer": "dense",
            "setting": "-",
            "ppl": dense.get("ppl"),
            "prune_s": 0.0,
            "peak_rss_mb": dense.get("peak_rss_mb"),
        }
    ]
    for scorer, (name, update), setting in cells:  # "wanda+refit": Wanda's mask, then the refit
        out = cli("prune", *common, "--scorer", name, "--update", update, *SETTINGS[setting])
        rows.append(
            {
                "scorer": scorer,
                "setting": setting,
                "ppl": out.get("ppl"),
                "prune_s": out.get("seconds_calibration", 0) + out.get("seconds_prune", 0)
                if "error" not in out
                else None,
                "peak_rss_mb": out.get("peak_rss_mb"),
                "error": out.get("error"),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    timing_args = copy.copy(args)
    timing_args.nsamples = args.timing_nsamples
    timing = {}
    if args.timing_nsamples:
        timing = {name: driver_vs_reference(timing_args, name) for name in ("wanda", "sparsegpt")}
    windows = args.max_windows or "all"
    lines = [
        f"# Pruning table: {args.model}",
        "",
        f"C4 calibration {args.nsamples} x {args.seqlen}, seed 0; WikiText-2 test ppl, seqlen {args.seqlen}, "
        f"{windows} windows.",
        "",
        "| scorer | setting | ppl | prune s | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r["ppl"] else f"error: {r.get('error')}"
        prune_s = f"{r['prune_s']:.1f}" if r["prune_s"] is not None else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "-"
        lines.append(f"| {r['scorer']} | {r['setting']} | {ppl} | {prune_s} | {rss} |")
    lines += (
        []
        if not timing
        else [
            "",
            f"Driver vs batch-1 reference loop ({args.timing_nsamples} x {args.seqlen} calibration, 50%):",
            "",
            "| scorer | driver s | reference s | ratio (target <= 1.0) |",
            "|---|---|---|---|",
        ]
    )
    lines += [
        f"| {k} | {v['driver_s']:.1f} | {v['reference_s']:.1f} | {v['ratio']:.3f} |"
        for k, v in timing.items()
    ]
    RESULTS.mkdir(exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"prune_table_{Path(args.model).stem}.md"
    path.write_text("\n".join(lines) + "\n")
    report({"rows": rows, "timing": timing, "table": str(path)}, args.json)


if __name__ == "__main__":
    main()
