"""The held-out table of `metric_search validate`: the top formulas of a run through the pruning core's
sequential driver, perplexity on WikiText-2 *test* (the split the search never saw), at the run's
sparsity and at 2:4, 4:8 and 60%, next to published metrics; a markdown table (and JSON) in the run
directory, updated after every cell."""

from __future__ import annotations

from dataclasses import dataclass, replace

from metric_search import rundir
from metric_search.engine import comparison_group
from metric_search.results import load_run
from pruning_core import files
from pruning_core.errors import UsageError
from pruning_core.masks import parse_setting
from pruning_core.scorers import SparsitySpec

DEFAULT_PATTERNS = "run,2:4,4:8,0.6"
DEFAULT_BASELINES = "wanda,sparsegpt,ria,pruner-zero"
EVAL_DATA = "wikitext2-test"
# CPU: a check sized for 2 cores: one cell (prune + test perplexity) of smollm2-135m takes ~45 s on an
# idle machine, 20 cells (one formula and four baselines at four patterns) ~15-20 min. GPU: the usual
# paper setting (2048-token windows, 128 calibration windows, the whole test split). Both run the same
# sequential driver.


@dataclass(frozen=True)
class ValidationPlan:
    """What ``validate`` measures: the run's best ``top`` formulas and ``baselines`` at ``patterns``,
    calibrated on ``nsamples`` x ``seqlen`` tokens, on the first ``max_windows`` test windows (None:
    all). ``calib``, ``calib_seed`` and the formulas' ``update``: None means the run's own."""

    top: int = 3
    patterns: str = DEFAULT_PATTERNS
    baselines: str = DEFAULT_BASELINES
    nsamples: int = 128
    seqlen: int = 512
    max_windows: int | None = None
    calib: str | None = None
    calib_seed: int | None = None
    tasks: str | None = None  # zero-shot tasks per cell
    limit: int | None = None  # zero-shot documents per task
    update: str | None = None


VALIDATE_PROFILES = {
    "cpu": ValidationPlan(top=1, nsamples=16, seqlen=256, max_windows=32),
    "gpu": ValidationPlan(top=3, nsamples=128, seqlen=2048, max_windows=None),
}


@dataclass(frozen=True)
class Row:
    label: str
    scorer: str | None = None  # a registered scorer
    formula: str | None = None  # or a formula of the run
    group: str | None = None  # None: the scorer's own default
    update: str = "none"  # weight update after the mask (pruning_core.updates)


def parse_patterns(text: str, run_patterns) -> list[tuple[str, tuple[float, int, int]]]:
    """'run,2:4,0.6' -> [(label, (sparsity, n, m))], without repeats; 'run' is every setting of the run."""
    patterns: dict[tuple, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        for value in (parse_setting(p, "--patterns") for p in (run_patterns if item == "run" else [item])):
            label = f"{value[1]}:{value[2]}" if value[2] else f"{value[0]:.0%}"
            patterns.setdefault(value, label)
    if not patterns:
        raise UsageError("--patterns is empty; pass e.g. run,2:4,4:8,0.6")
    return [(label, value) for value, label in patterns.items()]


def plan_rows(run, top: int, baselines: str, update: str) -> list[Row]:
    """The run's ``top`` formulas with ``update``, then each baseline (``name`` or ``name+update``)."""
    from pruning_core.scorers import resolve_scorer
    from pruning_core.updates import check_update, split_update

    hall = run.state.hall_of_fame
    if top < 0:
        raise UsageError(f"--top must be >= 0, got {top}")
    if top > len(hall):
        raise UsageError(
            f"run {run.path} has {len(hall)} formulas in its hall of fame; pass --top {len(hall)} or less"
        )
    group = comparison_group(run.settings)
    suffix = "" if check_update(update) == "none" else f" +{update}"
    rows = [
        Row(f"#{rank} `{key}`{suffix}", formula=key, group=group, update=update)
        for rank, key in enumerate(hall[:top], start=1)
    ]
    for name in (n.strip() for n in baselines.split(",")):
        if name:
            scorer, scorer_update = split_update(name)
            rows.append(Row(name, scorer=resolve_scorer(scorer).name, update=scorer_update))
    if not rows:
        raise UsageError("nothing to validate; pass --top K and/or --baselines NAMES")
    return rows


def dense_reference(source, evaluation, data_dir) -> dict:
    """The unpruned model's test ppl (and zero-shot accuracies with tasks): the table's first row."""
    from pruning_core.pipeline import evaluate

    model, tokenizer = source.load()
    measured = evaluate(model, tokenizer, evaluation, data_dir)
    return {"ppl": measured["ppl"], **({"zeroshot": measured["zeroshot"]} if "zeroshot" in measured else {})}


def _table(title: str, labels: list[str], rows: list[Row], cells: dict, dense, digits: int) -> list[str]:
    lines = [title, "", "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    if dense is not None:
        lines.append("| dense | " + " | ".join(f"{dense:.{digits}f}" for _ in labels) + " |")
    for row in rows:
        values = [cells.get((row.label, label)) for label in labels]
        shown = ["..." if v is None else f"{v:.{digits}f}" for v in values]
        lines.append(f"| {row.label} | " + " | ".join(shown) + " |")
    return lines


def render(run, settings: dict, patterns, rows: list[Row], records: list[dict], dense: dict) -> str:
    labels = [label for label, _ in patterns]
    lines = [
        f"# Validation of run `{run.config['run_id']}`",
        "",
        f"Perplexity on {EVAL_DATA} ({settings['max_windows'] or 'all'} windows of {settings['seqlen']} tokens) "
        f"after sequential pruning of `{run.settings.evaluator.model}` with {settings['nsamples']} x "
        f"{settings['seqlen']} tokens of `{settings['calib']}` (seed {settings['calib_seed']}). Lower is better.",
        "",
    ]
    ppl = {(r["metric"], r["pattern"]): r["ppl"] for r in records}
    lines += _table("## Perplexity", labels, rows, ppl, dense.get("ppl"), 3)
    if settings.get("tasks"):
        accuracy = {(r["metric"], r["pattern"]): r["zeroshot"]["mean_acc"] for r in records}
        limit = settings.get("limit")
        title = (
            f"## Zero-shot mean accuracy ({settings['tasks']}; "
            f"{f'first {limit} documents per task' if limit else 'all documents'}). Higher is better."
        )
        dense_acc = dense["zeroshot"]["mean_acc"] if "zeroshot" in dense else None
        lines += ["", *_table(title, labels, rows, accuracy, dense_acc, 4)]
    return "\n".join(lines) + "\n"


def heldout_run(
    run_dir, plan: ValidationPlan, machine=None, data_dir=None, progress: bool = False, on_cell=None
) -> dict:
    """Fill the table cell by cell (rewriting validation.md / .json each time); return its data.
    ``machine``: a ModelSource whose dtype, device and cache dir are used (the model is the run's)."""
    from pruning_core.pipeline import Evaluation, ModelSource, PruneJob, prune_and_evaluate
    from pruning_core.pruning import Calibration

    run = load_run(run_dir)
    evaluator = run.settings.evaluator
    p = plan
    if p.nsamples < 1 or p.seqlen < 8 or (p.max_windows is not None and p.max_windows < 1):
        raise UsageError("--nsamples and --max-windows must be >= 1 and --seqlen >= 8")
    patterns = parse_patterns(p.patterns, evaluator.patterns)
    rows = plan_rows(run, p.top, p.baselines, evaluator.update if p.update is None else p.update)
    settings = {
        "nsamples": p.nsamples,
        "seqlen": p.seqlen,
        "max_windows": p.max_windows,
        "calib": p.calib or evaluator.calib,
        "calib_seed": evaluator.calib_seed if p.calib_seed is None else p.calib_seed,
        "tasks": p.tasks,
        "limit": p.limit,
    }
    source = replace(machine or ModelSource(), name=evaluator.model)
    calibration = Calibration(settings["calib"], p.nsamples, p.seqlen, settings["calib_seed"])
    evaluation = Evaluation(EVAL_DATA, p.seqlen, p.max_windows, tasks=p.tasks, limit=p.limit)
    dense = dense_reference(source, evaluation, data_dir)
    records = []
    for label, (sparsity, n, m) in patterns:
        for row in rows:
            group = "row" if m else (row.group or _default_group(row.scorer))
            job = PruneJob(
                SparsitySpec(sparsity, n, m, group), source, row.scorer, row.formula, row.update,
                calibration, evaluation=evaluation, data_dir=data_dir, progress=progress,
            )  # fmt: skip
            _, _, result = prune_and_evaluate(job)
            records.append(
                {
                    "metric": row.label,
                    "scorer": row.scorer,
                    "formula": row.formula,
                    "pattern": label,
                    "group": group,
                    "update": row.update,
                    "ppl": result["ppl"],
                    "sparsity": result["sparsity"],
                    **({"zeroshot": result["zeroshot"]} if "zeroshot" in result else {}),
                }
            )
            _write(run, settings, patterns, rows, records, dense)
            if on_cell is not None:
                on_cell(records[-1])
    return _summary(run, settings, records, dense)


def _summary(run, settings: dict, records: list[dict], dense: dict) -> dict:
    summary = {
        "run_id": run.config["run_id"],
        "dense_ppl": dense["ppl"],
        "settings": settings,
        "cells": records,
    }
    if "zeroshot" in dense:
        summary["dense_zeroshot"] = dense["zeroshot"]
    return summary


def _default_group(scorer_name: str) -> str:
    from pruning_core.scorers import resolve_scorer

    return resolve_scorer(scorer_name).default_group


def _write(run, settings, patterns, rows, records, dense) -> None:
    files.atomic_write_text(
        run.path / rundir.VALIDATION, render(run, settings, patterns, rows, records, dense)
    )
    files.atomic_write_json(run.path / rundir.VALIDATION_JSON, _summary(run, settings, records, dense))
