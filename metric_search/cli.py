"""`python -m metric_search` (search), `... validate RUN_DIR`, `... export RUN_DIR`.

Every flag is checked before anything is written, so a bad input is one stderr line, exit code 2,
and an existing run directory unchanged.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from metric_search.arguments import (
    execution_from_args,
    explicit_flags,
    resume_settings,
    search_parser,
    settings_from_args,
)
from metric_search.config import ExecutionSettings, SearchSettings
from pruning_core.cli_common import OneLineParser, add_model_flags, emit, run_cli
from pruning_core.errors import UsageError


@dataclass
class SearchPlan:
    settings: SearchSettings
    execution: ExecutionSettings
    run_dir: Path
    run_id: str
    resume_config: dict | None  # the run's config.json when resuming
    as_json: bool


def plan_search(argv: list[str]) -> SearchPlan:
    """Every check that needs no model: flags, seed formulas, the run directory, the cluster address."""
    from metric_search import cluster, rundir
    from metric_search.engine import Engine

    parser = search_parser()
    args = parser.parse_args(argv)
    if args.resume and args.run_dir:
        raise UsageError("pass either --resume RUN_DIR or --run-dir DIR, not both")
    if args.resume:
        run, settings = resume_settings(args, explicit_flags(parser, argv))
        run_dir, run_id, config = run.path, run.config["run_id"], run.config
        _check_same_numbers(config, settings)
    else:
        settings = settings_from_args(args)
        run_id = rundir.new_run_id(settings.evaluator.model, settings.seed)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / run_id
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            rundir.prepare_new_run_dir(run_dir)  # raises the one-line "already exists" error
        config = None
    execution = execution_from_args(args, settings.evaluator.device)
    Engine(settings)  # seed formulas must have a GP form: fail now rather than after loading models
    cluster.check_address(execution.address)
    return SearchPlan(settings, execution, run_dir, run_id, config, args.json)


def _check_same_numbers(config: dict, settings: SearchSettings) -> None:
    """A run's results are comparable only under one device type and dtype: a resume that would
    compute with others is refused (the cached results would be mixed with different numbers)."""
    from fitness.setup import resolved_numbers

    now, then = resolved_numbers(settings.evaluator), config.get("numbers")
    if then is not None and now != then:
        raise UsageError(
            f"this resume would compute on {now['device']} in {now['dtype']} but the run used {then['device']} "
            f"in {then['dtype']}; pass --device {then['device']} --dtype {then['dtype']} or start a new run"
        )


def preflight(settings: SearchSettings, progress: bool) -> None:
    """Load the model, the statistics (computed once here and cached for the actors) and the fitness
    data in the driver: a bad model path or architecture is one clear line before any run directory."""
    import gc

    from fitness.setup import build_evaluator

    evaluator = build_evaluator(settings.evaluator, progress=progress)
    del evaluator
    gc.collect()
    import torch

    if torch.cuda.is_available():  # the actors need the device memory the driver's copy held
        torch.cuda.empty_cache()


def cmd_search(argv: list[str]) -> int:
    from metric_search import cluster, rundir
    from metric_search.dispatch import PoolError
    from metric_search.report import write_report
    from metric_search.results import hall_of_fame_entries, load_run
    from metric_search.search import Search, start_run
    from pruning_core import files

    plan = plan_search(argv)
    started = time.monotonic()
    x = plan.execution
    if x.preflight:
        preflight(plan.settings, x.progress)
    started_ray = cluster.connect(
        x.address, x.workers * x.threads if x.workers else None, x.use_gpu, x.runtime_env
    )
    try:
        if plan.resume_config is None:
            start_run(plan.settings, plan.run_dir, plan.run_id, x)
        elif plan.settings.as_dict() != plan.resume_config["settings"]:
            config = {**plan.resume_config, "settings": plan.settings.as_dict()}
            files.atomic_write_json(plan.run_dir / rundir.CONFIG, config)
        search = Search(plan.settings, x, plan.run_dir)
        try:
            state = search.run()
        except PoolError as err:  # the actors cannot start: a setup problem, not a bad candidate
            print(f"error: {err}; fix it and continue with --resume {plan.run_dir}", file=sys.stderr)
            return 1
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    write_report(plan.run_dir, load_run(plan.run_dir).config, state)
    hall = hall_of_fame_entries(state)
    wanda = (state.baselines.get("wanda") or {}).get("top") or {}
    chosen = state.final["chosen"] if state.final else (hall[0] if hall else None)
    result = {
        "run_dir": str(plan.run_dir),
        "run_id": plan.run_id,
        "generations": state.generation + 1,
        "best": hall[0] if hall else None,
        "chosen": chosen,
        "final": state.final,
        "hall_of_fame": hall,
        "wanda_top": wanda.get("fitness"),
        "actors_replaced": search.actors_replaced,
        "seconds": round(time.monotonic() - started, 2),
    }
    if state.final:
        c = state.final["chosen"]
        best = f"chosen `{c['formula']}`: {c['ratio']:.4f}x Wanda on held-out windows ({c['verdict']})"
    else:
        best = f"best `{hall[0]['formula']}`" if hall else "no formula measured by perplexity"
    human = (
        f"{plan.run_dir}: {result['generations']} generations, {best}, "
        f"{result['seconds']:.0f} s; report {plan.run_dir / 'report.md'}"
    )
    emit(result, plan.as_json, human)
    return 0


def validate_parser() -> OneLineParser:
    from metric_search.heldout import DEFAULT_BASELINES, DEFAULT_PATTERNS, VALIDATE_PROFILES

    def both(name: str) -> str:
        shown = {profile: getattr(plan, name) for profile, plan in VALIDATE_PROFILES.items()}
        return ", ".join(f"{profile} {'all' if value is None else value}" for profile, value in shown.items())

    p = OneLineParser(
        prog="python -m metric_search validate",
        allow_abbrev=False,
        description="The best formulas of a run on WikiText-2 test through the sequential pruning driver.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--profile", choices=sorted(VALIDATE_PROFILES), default="cpu", help="defaults for CPU or GPU"
    )
    p.add_argument("--top", type=int, help=f"hall-of-fame formulas to validate ({both('top')})")
    p.add_argument("--patterns", default=DEFAULT_PATTERNS, help=f"comma list ({DEFAULT_PATTERNS})")
    p.add_argument(
        "--baselines",
        default=DEFAULT_BASELINES,
        help=f"comma list, each NAME or NAME+UPDATE like wanda+obs ({DEFAULT_BASELINES})",
    )
    p.add_argument(
        "--update",
        default=None,
        help="weight update of the run's formulas: none, obs, refit or adaptive (the run's)",
    )
    p.add_argument("--nsamples", type=int, help=f"calibration windows ({both('nsamples')})")
    p.add_argument("--seqlen", type=int, help=f"calibration and evaluation window length ({both('seqlen')})")
    p.add_argument("--max-windows", type=int, help=f"first N test windows ({both('max_windows')}; 0 for all)")
    p.add_argument("--calib", default=None, help="calibration corpus (the run's)")
    p.add_argument("--tasks", default=None, help="zero-shot tasks per cell: 'zeroshot' or a comma list")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: first N documents per task")
    add_model_flags(p)
    return p


def cmd_validate(argv: list[str]) -> int:
    from metric_search.heldout import VALIDATE_PROFILES, heldout_run
    from pruning_core.pipeline import ModelSource

    p = validate_parser()
    args = p.parse_args(argv)
    if "model" in explicit_flags(p, argv):
        raise UsageError("validate uses the run's model; drop --model")
    if args.tasks:
        from pruning_core.zeroshot import parse_tasks

        parse_tasks(args.tasks)  # a bad task name fails before any model loads
    if args.limit is not None and args.limit < 1:
        raise UsageError(
            f"--limit {args.limit} must be a positive number of documents per task; drop it for all"
        )
    sized = {
        k: getattr(args, k)
        for k in ("top", "nsamples", "seqlen", "max_windows")
        if getattr(args, k) is not None
    }
    plan = replace(
        VALIDATE_PROFILES[args.profile], **sized, patterns=args.patterns, baselines=args.baselines,
        calib=args.calib, tasks=args.tasks, limit=args.limit, update=args.update,
    )  # fmt: skip
    plan = replace(plan, max_windows=plan.max_windows or None)  # 0: the whole test split

    def show(cell):
        if not args.json:
            accuracy = (
                f", zero-shot mean acc {cell['zeroshot']['mean_acc']:.4f}" if "zeroshot" in cell else ""
            )
            print(f"{cell['pattern']:>6} {cell['metric']}: ppl {cell['ppl']:.3f}{accuracy}", file=sys.stderr)

    machine = ModelSource(dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
    result = heldout_run(args.run_dir, plan, machine, args.data_dir, progress=not args.json, on_cell=show)
    emit(result, args.json, f"wrote {Path(args.run_dir) / 'validation.md'}")
    return 0


def cmd_export(argv: list[str]) -> int:
    from metric_search.export import export_plugins

    p = OneLineParser(
        prog="python -m metric_search export",
        allow_abbrev=False,
        description="Write the best formulas of a run as scorer plugins (JSON data files, never code).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--top", type=int, default=1, help="how many of the best formulas (1)")
    p.add_argument("--dir", default=None, help="plugin folder (default: the user plugin dir)")
    p.add_argument("--name", default=None, help="plugin name (NAME-RANK when --top > 1)")
    p.add_argument("--force", action="store_true", help="replace plugin files with the same name")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    written = export_plugins(args.run_dir, args.top, args.dir, args.name, args.force)
    lines = [f"{w['name']}: {w['formula']} -> {w['path']}" for w in written]
    emit({"plugins": written}, args.json, "\n".join(lines))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"validate": cmd_validate, "export": cmd_export}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return cmd_search(argv)


def entry(argv=None) -> None:
    sys.exit(run_cli(main, argv))
