"""`export`: the best formulas of a run as scorer plugins, JSON data files in the pruning core's plugin
schema (formula text, statistics, group, provenance), never code. Every check runs before any write,
and each file is written atomically."""

from __future__ import annotations

import json
import re
from pathlib import Path

from metric_search.engine import comparison_group
from metric_search.report import TOP_RUNG_TEXT
from metric_search.results import load_run
from primitives.scorer import FormulaScorer
from pruning_core.errors import UsageError
from pruning_core.files import atomic_write_text
from pruning_core.plugins import PLUGIN_FORMAT, PLUGIN_VERSION, checked_plugin, user_plugin_dir
from pruning_core.scorers.base import registered
from pruning_core.updates import stats_with_update


def default_name(run_id: str, rank: int) -> str:
    slug = re.sub(r"[^a-z0-9_.-]+", "-", run_id.lower()).strip("-.")
    return f"ms-{slug}"[:60].rstrip("-.") + f"-{rank}"


def plugin_data(run, key: str, rank: int, name: str) -> dict:
    evaluator = run.settings.evaluator
    entry = run.state.candidates[key]
    formula = entry["formula"]
    group = comparison_group(run.settings)
    pattern = ",".join(evaluator.patterns)
    update = {"update": evaluator.update} if evaluator.update != "none" else {}
    return {
        "format": PLUGIN_FORMAT,
        "version": PLUGIN_VERSION,
        "name": name,
        "formula": formula,
        "stats": list(stats_with_update(FormulaScorer(formula, group=group).stats, evaluator.update)),
        "group": group,
        **update,
        "description": f"rank {rank} of metric_search run {run.config['run_id']} ({evaluator.model}, {pattern})",
        "provenance": {
            "run_id": run.config["run_id"],
            "rank": rank,
            "seed": run.settings.seed,
            "model": evaluator.model,
            "pattern": pattern,
            "fitness": (entry.get("top") or entry["ppl"])["fitness"],
            "fitness_kind": f"geometric mean over {pattern} of the perplexity on "
            f"{evaluator.top_windows if entry.get('top') else evaluator.fitness_windows} x "
            f"{evaluator.fitness_seqlen} tokens of {evaluator.fitness_data}"
            + (TOP_RUNG_TEXT.get(evaluator.top_rung, "") if entry.get("top") else ""),
            "proxy": entry["proxy"]["fitness"] if entry.get("proxy") else None,
            "generation": entry.get("generation"),
        },
    }


def export_plugins(
    run_dir, top: int, directory=None, name: str | None = None, force: bool = False
) -> list[dict]:
    """Write the ``top`` best formulas as plugin files; return [{name, path, formula}]."""
    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    run = load_run(run_dir)
    hall = run.state.hall_of_fame
    if not hall:
        raise UsageError(f"run {run.path} has no formula confirmed by perplexity yet; let it run longer")
    if top > len(hall):
        raise UsageError(
            f"run {run.path} has {len(hall)} formulas in its hall of fame; pass --top {len(hall)} or less"
        )
    directory = Path(directory) if directory else user_plugin_dir()
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--dir {directory} is a file; pass a folder for the plugin .json files")
    names = [
        (name if top == 1 else f"{name}-{rank}") if name else default_name(run.config["run_id"], rank)
        for rank in range(1, top + 1)
    ]
    builtins = registered()
    planned = []
    for rank, (key, plugin_name) in enumerate(zip(hall[:top], names), start=1):
        data = checked_plugin(plugin_data(run, key, rank, plugin_name), f"{plugin_name!r}")
        if plugin_name in builtins and not hasattr(builtins[plugin_name], "provenance"):
            raise UsageError(f"--name {plugin_name!r} is a built-in scorer; choose another --name")
        path = directory / f"{plugin_name}.json"
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
        if path.exists() and not force and path.read_text(encoding="utf-8", errors="replace") != text:
            raise UsageError(f"{path} exists with other content; pass --force to replace it or choose --name")
        planned.append((path, text, data))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --dir {directory} ({err.strerror}); pass a writable folder") from err
    for path, text, _ in planned:
        atomic_write_text(path, text)
    return [{"name": d["name"], "path": str(p), "formula": d["formula"]} for p, _, d in planned]
