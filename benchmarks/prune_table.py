"""Perplexity, prune time and peak RSS of every built-in scorer at several sparsities on one model,
each run in its own `python -m pruning_core prune --json` process; a markdown table under
benchmarks/results/. Also times the driver against a straightforward batch-1 reference loop.

A full table at 128 x 512 calibration takes hours on a CPU, so each finished cell is appended to a JSON-lines
file next to the table (`--cells`) and a rerun with the same calibration, window length and windows skips
the cells that file already holds: an interrupted run resumes where it stopped. `--render-only` writes the
table from that file alone (cells not yet measured show as "pending"). Notes written by hand go in a file
beside the table (`--notes`, default: the `--out` path with `.notes.md`), appended below the tables on every
render, so a rerun cannot overwrite them."""

from __future__ import annotations

import copy
import json
import os
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


def _commit() -> str:
    """The checkout's commit, recorded with each cell (a table may be filled over several commits)."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=RESULTS.parent, capture_output=True, text=True
        )
    except OSError:  # no git on this machine
        return "unknown"
    return described.stdout.strip() or "unknown"


def load_cells(path: Path, config: dict) -> dict:
    """The finished cells of `path` measured with `config`, by (scorer, setting); failed cells run again."""
    done = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run: that cell runs again
            continue
        # cells written before the table took --seed were all measured with calibration seed 0
        if {"seed": 0, **row.get("config", {})} == config and not row.get("error"):
            done[(row["scorer"], row["setting"])] = row
    return done


def append_cell(path: Path, config: dict, commit: str, scorer: str, setting: str, out: dict, prune_s) -> dict:
    row = {
        "scorer": scorer,
        "setting": setting,
        "ppl": out.get("ppl"),
        "prune_s": prune_s,
        "peak_rss_mb": out.get("peak_rss_mb"),
        "error": out.get("error"),
        "commit": commit,
        "config": config,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:  # one line per cell, flushed: a killed run loses at most the cell it was in
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return row


def _format(cell: dict | None, key: str, spec: str) -> str:
    if cell is None:
        return "pending"
    return (
        format(cell[key], spec)
        if cell[key] is not None and not cell.get("error")
        else f"error: {cell['error']}"
    )


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
    p.add_argument("--seed", type=int, default=0, help="calibration seed (which C4 windows calibrate)")
    p.add_argument(
        "--timing-nsamples",
        type=int,
        default=16,
        help="calibration samples for the timing runs (0: skip them)",
    )
    p.add_argument(
        "--out", default=None, help="markdown file (default benchmarks/results/prune_table_<model>.md)"
    )
    p.add_argument(
        "--cells",
        default=None,
        help="JSON-lines file of finished cells, read to resume and appended to (default: --out as .jsonl)",
    )
    p.add_argument(
        "--notes",
        default=None,
        help="markdown appended below the tables when it exists (default: --out as .notes.md)",
    )
    p.add_argument(
        "--render-only", action="store_true", help="write the table from --cells without running any cell"
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
    config_keys = ("model", "device", "dtype", "nsamples", "seqlen", "max_windows", "seed")
    config = {k: getattr(args, k) for k in config_keys}
    path = Path(args.out) if args.out else RESULTS / f"prune_table_{Path(args.model).stem}.md"
    cells_path = Path(args.cells) if args.cells else path.with_suffix(".jsonl")
    notes_path = Path(args.notes) if args.notes else path.with_suffix(".notes.md")
    done = load_cells(cells_path, config)
    commit = _commit()
    if ("dense", "-") not in done and not args.render_only:
        dense = cli("eval", *base, "--data", "wikitext2-test")
        done[("dense", "-")] = append_cell(
            cells_path, config, commit, "dense", "-", dense, prune_s=0.0 if "error" not in dense else None
        )
    common = [
        *base,
        "--calib",
        "c4",
        "--nsamples",
        str(args.nsamples),
        "--seed",
        str(args.seed),
        "--eval",
        "wikitext2-test",
    ]
    for scorer, (name, update), setting in cells:  # "wanda+refit": Wanda's mask, then the refit
        if (scorer, setting) in done or args.render_only:
            continue
        out = cli("prune", *common, "--scorer", name, "--update", update, *SETTINGS[setting])
        prune_s = out.get("seconds_calibration", 0) + out.get("seconds_prune", 0)
        done[(scorer, setting)] = append_cell(
            cells_path, config, commit, scorer, setting, out, prune_s if "error" not in out else None
        )
        print(json.dumps(done[(scorer, setting)]), file=sys.stderr)
    scorers = list(dict.fromkeys(scorer for scorer, _, _ in cells))
    keys = [("dense", "-")] + [(s, t) for s in scorers for t in settings]
    rows = [done[key] for key in keys if key in done]
    timing_args = copy.copy(args)
    timing_args.nsamples = args.timing_nsamples
    timing = {}
    if args.timing_nsamples and not args.render_only:
        timing = {name: driver_vs_reference(timing_args, name) for name in ("wanda", "sparsegpt")}
    windows = args.max_windows or "all"
    dense = done.get(("dense", "-"))
    missing = sum(key not in done for key in keys)
    commits = sorted({r["commit"] for r in rows})
    pending = f" {missing} of {len(keys)} cells are pending: rerun the same command to measure them."
    lines = [
        f"# Pruning table: {args.model}",
        "",
        f"C4 calibration {args.nsamples} x {args.seqlen}, seed {args.seed}; WikiText-2 test ppl, "
        f"seqlen {args.seqlen}, {windows} windows; dense ppl {_format(dense, 'ppl', '.2f')}. "
        f"Cells measured at {', '.join(commits) or 'none yet'}; "
        "each is one `python -m pruning_core prune --json` process." + (pending if missing else ""),
    ]
    for title, key, spec in (
        ("Perplexity (lower is better)", "ppl", ".2f"),
        ("Prune seconds (calibration forwards + scoring + masking and updates)", "prune_s", ".0f"),
        ("Peak RSS MB", "peak_rss_mb", ".0f"),
    ):
        lines += [
            "",
            f"{title}:",
            "",
            f"| scorer | {' | '.join(settings)} |",
            "|---" * (len(settings) + 1) + "|",
        ]
        for scorer in scorers:
            values = [_format(done.get((scorer, t)), key, spec) for t in settings]
            lines.append(f"| {scorer} | {' | '.join(values)} |")
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
    if notes_path.exists():
        lines += ["", notes_path.read_text().rstrip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    report({"rows": rows, "timing": timing, "table": str(path)}, args.json)


if __name__ == "__main__":
    main()
