"""Quality of the metric search as a whole, over several seeds: each seed runs one full
`python -m metric_search` search; the formula it chooses is then pruned on a protocol the search never
touched (C4 calibration, calibration seed 0, WikiText-2 *test* perplexity) at each setting (default
50% unstructured and 2:4), next to the baselines (default wanda and ria) on the same protocol, each
prune in its own `python -m pruning_core prune --json` process.

Per seed: the formula, whether it is (canonically) one of the run's seed formulas, the search time,
and per setting its ppl, the best baseline's ppl and ratio = ppl / best baseline ppl.
Target: median ratio <= 0.97 in every setting (50% and 2:4), and the formula is not a seed formula
for >= 2 of 3 seeds (in general >= ceil(2/3 * seeds)).

Everything lands in --runs-dir: seed-S/ (the run), seed-S.log (its stderr), seed-S/search_result.json,
validation.json (one cached cell per formula or baseline and setting), validation.log and
search_quality.md. With --reuse a finished search and every measured cell are read back, and an
unfinished search is resumed.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import parser, report

from metric_search.config import CPU_PROFILE
from pruning_core.errors import UsageError
from pruning_core.files import atomic_write_json, atomic_write_text
from pruning_core.updates import check_update, split_update

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.97
RESULT_FILE = "search_result.json"
MARK = "search_quality"  # the key this script adds to search_result.json


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser():
    p = parser(__doc__.split("\n\n")[0])
    p.error = fail  # argparse's own errors become one line, exit code 2, too
    p.add_argument("--seeds", default="0,1,2", help="comma list of search seeds (0,1,2)")
    p.add_argument(
        "--search-args",
        default="",
        help="extra flags for every search, verbatim (shlex split), e.g. --search-args='--generations 5'",
    )
    p.add_argument("--runs-dir", default=None, help="default runs/search-quality-<timestamp>")
    p.add_argument("--reuse", action="store_true", help="read back finished searches and cached cells")
    p.add_argument("--validation-nsamples", type=int, default=16, help="C4 calibration windows (16)")
    p.add_argument("--validation-seqlen", type=int, default=512, help="calibration and eval length (512)")
    p.add_argument("--validation-windows", type=int, default=16, help="WikiText-2 test windows (16; 0 = all)")
    p.add_argument("--settings", default="0.5,2:4", help="comma list: a sparsity like 0.5 or N:M (0.5,2:4)")
    p.add_argument(
        "--baselines",
        default="wanda,ria",
        help="comma list of built-in scorers, each optionally with a weight update: wanda,ria,wanda+obs (wanda,ria)",
    )
    update = CPU_PROFILE.search.evaluator.update
    p.add_argument(
        "--update",
        default=update,
        help=f"weight update of the searches (their --update) and of the chosen formulas' validation ({update}, "
        "the CPU profile's)",
    )
    p.add_argument(
        "--per-setting",
        action="store_true",
        help="one search per setting (--settings S) instead of one over all; each chosen formula is "
        "validated at every setting, and counted at its own",
    )
    p.add_argument("--dry-run", action="store_true", help="print the search commands and stop")
    return p


def parse_seeds(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        fail("--seeds is empty; e.g. --seeds 0,1,2")
    if not all(item.lstrip("-").isdigit() for item in items):
        fail(f"--seeds must be a comma list of integers, got {text!r}")
    seeds = [int(item) for item in items]
    if len(set(seeds)) != len(seeds):
        fail(f"--seeds repeats a seed: {text!r}")
    return seeds


def setting_flags(item: str) -> list[str]:
    """'0.5' -> --sparsity 0.5, '2:4' -> --pattern 2:4; anything else is a one-line error."""
    if ":" in item:
        parts = item.split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1]):
            return ["--pattern", item]
    else:
        try:
            if 0 < float(item) < 1:
                return ["--sparsity", item]
        except ValueError:
            pass
    fail(f"bad --settings item {item!r}; use a sparsity in (0, 1) like 0.5 or N:M like 2:4")


def parse_settings(text: str) -> dict[str, list[str]]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        fail("--settings is empty; e.g. --settings 0.5,2:4")
    return {item: setting_flags(item) for item in dict.fromkeys(items)}


def parse_names(text: str, flag: str) -> list[str]:
    names = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not names:
        fail(f"{flag} is empty; e.g. {flag} wanda,ria")
    return names


def model_flags(args) -> list[str]:
    flags = ["--model", args.model]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype), ("--data-dir", args.data_dir)):
        if value:
            flags += [flag, value]
    return flags


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_json(cmd: list[str], log: Path) -> tuple[dict | None, str | None, float]:
    """Run one CLI with --json: (its JSON, None, seconds), or (None, its stderr's last line, seconds).
    Its stderr is appended to `log`, so a user can follow it."""
    offset = log.stat().st_size if log.exists() else 0
    started = time.perf_counter()
    with open(log, "a") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    out = last_json_line(proc.stdout) if proc.returncode == 0 else None
    if out is not None:
        return out, None, seconds
    with open(log, errors="replace") as f:
        f.seek(offset)
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit code {proc.returncode}"
    return None, reason if proc.returncode else f"no JSON on stdout ({reason})", seconds


# ---- searches ----


def search_command(args, seed: int, run_dir: Path, resume: bool, setting: str | None = None) -> list[str]:
    where = ["--resume", str(run_dir)] if resume else ["--run-dir", str(run_dir)]
    where += ["--settings", setting] if setting and not resume else []
    return [
        sys.executable, "-m", "metric_search", "--seed", str(seed), *where, "--json", "--quiet",
        *model_flags(args), "--update", args.update,
        *shlex.split(args.search_args),
    ]  # fmt: skip


def finished_search(run_dir: Path) -> dict | None:
    path = run_dir / RESULT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and MARK in data else None


def chosen_formula(result: dict) -> str | None:
    return (result.get("chosen") or {}).get("formula") or (result.get("best") or {}).get("formula")


def seed_formula_keys(run_dir: Path) -> set[str] | None:
    from primitives import canonical_key

    try:
        config = json.loads((run_dir / "config.json").read_text())
        return {canonical_key(text, "row") for text in config["settings"]["seed_formulas"]}
    except Exception:  # noqa: BLE001  no or unreadable config: unknown, not a guess
        return None


def is_seed_formula(formula: str, run_dir: Path) -> bool | None:
    from primitives import canonical_key

    keys = seed_formula_keys(run_dir)
    if keys is None:
        return None
    try:
        return canonical_key(formula, "row") in keys
    except Exception:  # noqa: BLE001
        return None


def search_dir(seed: int, setting: str | None) -> str:
    return f"seed-{seed}" if setting is None else f"seed-{seed}-{setting.replace(':', '-')}"


def run_search(args, seed: int, runs: Path, setting: str | None = None) -> dict:
    """One seed's search (over ``setting`` only, if given; or its saved result with --reuse) -> its record."""
    name = search_dir(seed, setting)
    run_dir, log = runs / name, runs / f"{name}.log"
    result = finished_search(run_dir) if args.reuse else None
    if result is None:
        resume = args.reuse and (run_dir / "config.json").exists()
        print(f"seed {seed}: {'resuming' if resume else 'searching'} (log {log})", file=sys.stderr)
        cmd = search_command(args, seed, run_dir, resume, setting)
        result, error, seconds = run_json(cmd, log)
        if error:
            return {
                "seed": seed,
                "setting": setting,
                "formula": None,
                "is_seed_formula": None,
                "search_seconds": seconds,
                "error": error,
            }
        result[MARK] = {"seconds": round(seconds, 2), "command": cmd}
        atomic_write_json(run_dir / RESULT_FILE, result, indent=1, allow_nan=True)
    formula = chosen_formula(result)
    return {
        "seed": seed,
        "setting": setting,
        "formula": formula,
        "is_seed_formula": None if formula is None else is_seed_formula(formula, run_dir),
        "search_seconds": result[MARK]["seconds"],
        "error": None if formula else "the search confirmed no formula",
    }


# ---- validation ----


def protocol(args) -> dict:
    return {
        "model": args.model, "dtype": args.dtype, "calib": "c4", "nsamples": args.validation_nsamples,
        "seqlen": args.validation_seqlen, "seed": 0, "eval": "wikitext2-test",
        "max_windows": args.validation_windows,
    }  # fmt: skip


def prune_command(args, target: list[str], flags: list[str]) -> list[str]:
    p = protocol(args)
    cmd = [
        sys.executable, "-m", "pruning_core", "prune", *model_flags(args), *target, "--calib", p["calib"],
        "--nsamples", str(p["nsamples"]), "--seqlen", str(p["seqlen"]), "--seed", "0", "--eval", p["eval"],
    ]  # fmt: skip
    if p["max_windows"]:
        cmd += ["--max-windows", str(p["max_windows"])]
    return [*cmd, *flags, "--json"]


def load_cells(path: Path, args) -> dict:
    """Cached cells of an earlier run with --reuse; a different protocol is a one-line error."""
    if not (args.reuse and path.exists()):
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        fail(f"{path} is unreadable ({err}); delete it or use another --runs-dir")
    if data.get("protocol") != protocol(args):
        fail(
            f"{path} was measured with {json.dumps(data.get('protocol'), sort_keys=True)}, "
            f"not {json.dumps(protocol(args), sort_keys=True)}; use another --runs-dir"
        )
    return data.get("cells", {})


def measure_cell(args, target: list[str], flags: list[str], log: Path) -> dict:
    out, error, seconds = run_json(prune_command(args, target, flags), log)
    if error:
        return {"ppl": None, "error": error, "seconds": round(seconds, 1)}
    return {"ppl": out.get("ppl"), "sparsity": out.get("sparsity"), "seconds": round(seconds, 1)}


def scorer_flags(name: str) -> list[str]:
    """``wanda`` -> --scorer wanda; ``wanda+obs`` -> --scorer wanda --update obs."""
    scorer, update = split_update(name)
    return ["--scorer", scorer, *(["--update", update] if update != "none" else [])]


def validate(
    args, formulas: list[str], baselines: list[str], settings: dict, runs: Path, cells: dict
) -> dict:
    """Every (formula or baseline, setting) cell -> {ppl, ...}; each finished cell is saved at once."""
    path, log = runs / "validation.json", runs / "validation.log"
    targets = {f"scorer:{name}": scorer_flags(name) for name in baselines}
    update = [] if args.update == "none" else ["--update", args.update]
    targets.update(
        {formula_label(f, args.update): ["--formula", f, "--group", "row", *update] for f in formulas}
    )
    for label, target in targets.items():
        for setting, flags in settings.items():
            key = f"{label} @ {setting}"
            if cells.get(key, {}).get("ppl") is not None:
                continue
            print(f"validating {key}", file=sys.stderr)
            cells[key] = measure_cell(args, target, flags, log)
            atomic_write_json(path, {"protocol": protocol(args), "cells": cells}, indent=1, allow_nan=True)
    return cells


# ---- summary ----


def baseline_table(cells: dict, baselines: list[str], settings: dict) -> dict:
    return {
        s: {name: cells.get(f"scorer:{name} @ {s}", {}).get("ppl") for name in baselines} for s in settings
    }


def formula_label(formula: str, update: str) -> str:
    return f"formula:{formula}" + ("" if update == "none" else f"+{update}")


def seed_settings(record: dict, cells: dict, base: dict, update: str) -> dict:
    per = {}
    for setting, ppls in base.items():
        measured = {name: ppl for name, ppl in ppls.items() if ppl is not None}
        best = min(measured, key=measured.get) if measured else None
        cell = cells.get(f"{formula_label(record['formula'], update)} @ {setting}", {})
        ppl, best_ppl = cell.get("ppl"), measured.get(best)
        per[setting] = {
            "ppl": ppl,
            "best_baseline": best,
            "best_baseline_ppl": best_ppl,
            "ratio": ppl / best_ppl if ppl is not None and best_ppl else None,
        }
        if cell.get("error"):
            per[setting]["error"] = cell["error"]
    return per


def summarize(args, records: list[dict], cells: dict, baselines: list[str], settings: dict) -> dict:
    base = baseline_table(cells, baselines, settings)
    for record in records:
        if not record.get("error"):
            record["settings"] = seed_settings(record, cells, base, args.update)
    ok = [r for r in records if not r.get("error")]
    medians, non_seed = {}, {}
    for s in settings:
        # a search over one setting counts at that setting only (it is validated at the others too)
        own = [r for r in ok if r.get("setting") in (None, s)]
        ratios = [r["settings"][s]["ratio"] for r in own if r["settings"][s]["ratio"] is not None]
        medians[s] = statistics.median(ratios) if ratios else None
        non_seed[s] = sum(1 for r in own if r.get("is_seed_formula") is False)
    searches = len({r["seed"] for r in records})
    needed = -(-2 * searches // 3)  # ceil(2/3 * seeds), in every setting
    met = all(m is not None and m <= TARGET_RATIO for m in medians.values()) and all(
        count >= needed for count in non_seed.values()
    )
    return {
        "model": args.model,
        "seeds": sorted({r["seed"] for r in records}),
        "per_setting": args.per_setting,
        "search_args": args.search_args,
        "update": args.update,
        "settings": list(settings),
        "baselines": baselines,
        "validation": protocol(args),
        "per_seed": records,
        "baseline_ppl": base,
        "median_ratio": medians,
        "seeds_succeeded": len(ok),
        "non_seed_count": non_seed,
        "non_seed_needed": needed,
        "target": {"median_ratio_max": TARGET_RATIO, "non_seed_min": needed},
        "target_met": met,
    }


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def seed_row(r: dict, settings: list[str]) -> str:
    if r.get("error"):
        return (
            f"| {r['seed']} | {r.get('setting') or 'all'} | failed: {r['error'].replace('|', '/')} | - | "
            f"{fmt(r.get('search_seconds'), '.0f')} |" + (" - | - |" * len(settings))
        )
    seedness = {True: "yes", False: "no", None: "?"}[r.get("is_seed_formula")]
    cells = [r["settings"][s] for s in settings]
    cols = "".join(
        f" {'failed' if c.get('error') else fmt(c['ppl'])} | {fmt(c['ratio'], '.3f')} |" for c in cells
    )
    formula = r["formula"].replace("|", "\\|")
    return f"| {r['seed']} | {r.get('setting') or 'all'} | `{formula}` | {seedness} | {r['search_seconds']:.0f} |{cols}"


def markdown(result: dict) -> str:
    settings, v = result["settings"], result["validation"]
    head = "".join(f" {s} ppl | {s} ratio |" for s in settings)
    best = "".join(
        f" {fmt(min((p for p in result['baseline_ppl'][s].values() if p is not None), default=None))} | |"
        for s in settings
    )
    medians = "".join(f" | {fmt(result['median_ratio'][s], '.3f')} |" for s in settings)
    lines = [
        f"# Search quality: {result['model']}",
        "",
        f"Seeds {', '.join(map(str, result['seeds']))}; search args `{result['search_args'] or '-'}`, update `{result.get('update', 'none')}`. Validation: "
        f"C4 calibration {v['nsamples']} x {v['seqlen']}, seed 0; WikiText-2 test ppl, "
        f"{v['max_windows'] or 'all'} windows. Ratio = formula ppl / best of {', '.join(result['baselines'])}.",
        "",
        f"| seed | searched on | formula | seed formula | search s |{head}",
        "|---|---|---|---|---|" + "---|---|" * len(settings),
        *[seed_row(r, settings) for r in result["per_seed"]],
        f"| best baseline | | | | |{best}",
        f"| median (own setting) | | | | |{medians}",
        "",
        "Not a seed formula, per setting: "
        + ", ".join(f"{s} {n} of {len(result['seeds'])}" for s, n in result["non_seed_count"].items())
        + f" (target >= {result['non_seed_needed']}); median ratio target <= {TARGET_RATIO} in every setting. "
        f"Target met: {'yes' if result['target_met'] else 'no'}.",
    ]
    return "\n".join(lines) + "\n"


def runs_dir(args) -> Path:
    if args.runs_dir is None:
        return REPO / "runs" / f"search-quality-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = Path(args.runs_dir).resolve()
    if not args.reuse and runs.is_dir() and any(runs.iterdir()):
        fail(f"{runs} is not empty; pass --reuse to continue it or choose another --runs-dir")
    if runs.exists() and not runs.is_dir():
        fail(f"--runs-dir {runs} is not a directory")
    return runs


def main():
    args = build_parser().parse_args()
    seeds, settings = parse_seeds(args.seeds), parse_settings(args.settings)
    baselines = parse_names(args.baselines, "--baselines")
    try:  # a bad update, here or in NAME+UPDATE, stops before any search
        check_update(args.update)
        for name in baselines:
            split_update(name)
    except UsageError as err:
        fail(str(err))
    try:
        shlex.split(args.search_args)
    except ValueError as err:
        fail(f"--search-args cannot be split: {err}")
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())  # the subprocesses run in the repository
    runs = runs_dir(args)
    plan = [(seed, setting) for seed in seeds for setting in (settings if args.per_setting else [None])]
    if args.dry_run:
        for seed, setting in plan:
            print(shlex.join(search_command(args, seed, runs / search_dir(seed, setting), False, setting)))
        return
    cells = load_cells(runs / "validation.json", args)  # a protocol mismatch stops before any search
    runs.mkdir(parents=True, exist_ok=True)
    records = [run_search(args, seed, runs, setting) for seed, setting in plan]
    formulas = list(dict.fromkeys(r["formula"] for r in records if not r.get("error")))
    cells = validate(args, formulas, baselines, settings, runs, cells)
    result = summarize(args, records, cells, baselines, settings)
    result["runs_dir"], result["table"] = str(runs), str(runs / "search_quality.md")
    text = markdown(result)
    atomic_write_text(runs / "search_quality.md", text)
    if args.json:
        report(result, True)
    else:
        print(text, end="")
        print(f"median ratio: {result['median_ratio']}; target met: {result['target_met']}")
        print(f"wrote {result['table']}")


if __name__ == "__main__":
    main()
