"""Command-line flags -> settings: the search parser, the CPU / GPU profile defaults, seed formulas,
and what a ``--resume`` may change (how to run) or must keep (what to search)."""

from __future__ import annotations

from dataclasses import replace

from fitness.evaluator import TOP_RUNGS
from fitness.windows import WINDOW_ORDERS
from metric_search import cluster
from metric_search.config import (
    PROFILES,
    ExecutionSettings,
    SearchSettings,
    check_execution,
    check_search,
)
from pruning_core.cli_common import OneLineParser, add_model_flags
from pruning_core.errors import UsageError

# The initial population starts from published metrics, so that 20 CPU generations refine good
# formulas instead of first rediscovering them.
DEFAULT_SEEDS = "wanda,magnitude,pruner-zero,ria,sparsegpt-mask"

# Flags a resume may change: they say how to run, not what to search.
RESUMABLE = {
    "generations", "workers", "threads", "actors_per_gpu", "address", "runtime_env", "candidate_timeout", "no_preflight",
    "quiet", "json",
    "resume", "profile", "device", "dtype", "cache_dir", "data_dir",
}  # fmt: skip


# Flags that set one settings field, by argparse dest: the field of SearchSettings, of its EvaluatorSettings
# or of ExecutionSettings. A flag left out keeps its profile's value; help texts show the profiles' values.
SEARCH_FIELDS = {name: name for name in (
    "generations", "population", "seed", "cx_prob", "mut_prob", "tournament", "elite", "hof_size", "max_depth",
    "max_size", "confirm", "promote", "tune", "final_top", "final_windows",
)}  # fmt: skip
EVALUATOR_FIELDS = {
    "calib": "calib", "nsamples": "nsamples", "seqlen": "calib_seqlen", "calib_seed": "calib_seed",
    "group": "group", "fitness_data": "fitness_data", "fitness_windows": "fitness_windows",
    "top_windows": "top_windows", "fitness_seqlen": "fitness_seqlen", "update": "update", "top_rung": "top_rung",
    "fitness_batch": "batch_size", "window_order": "window_order", "candidate_timeout": "timeout_s",
}  # fmt: skip
EXECUTION_FIELDS = {name: name for name in ("threads", "actors_per_gpu", "candidate_timeout")}


def _profile_value(profile, dest: str):
    if dest in SEARCH_FIELDS:
        return getattr(profile.search, SEARCH_FIELDS[dest])
    if dest in EVALUATOR_FIELDS:
        return getattr(profile.search.evaluator, EVALUATOR_FIELDS[dest])
    if dest in EXECUTION_FIELDS:
        return getattr(profile.execution, EXECUTION_FIELDS[dest])
    if dest == "settings":
        return ",".join(profile.search.evaluator.patterns)
    return getattr(profile.search, dest)  # a field no single flag sets, e.g. init_min_depth


def _default(dest: str) -> str:
    """A flag's default for its help text, read from the profiles (so it cannot drift): one value when
    the profiles agree, else each profile's."""
    shown = {
        name: f"{value:g}" if isinstance(value, float) else str(value)
        for name, value in ((name, _profile_value(profile, dest)) for name, profile in PROFILES.items())
    }
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return "; ".join(f"{name} {text}" for name, text in shown.items())


def search_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m metric_search",
        description="Evolve pruning metrics by genetic programming on Ray. Subcommands: validate RUN_DIR, "
        "export RUN_DIR (see `python -m metric_search validate --help`).",
        allow_abbrev=False,
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="defaults sized for CPU or GPU")
    _evolution_flags(p.add_argument_group("evolution"))
    _fitness_flags(p.add_argument_group("fitness"))
    add_model_flags(p)
    _execution_flags(p.add_argument_group("execution"))
    return p


def _evolution_flags(g) -> None:
    """What to evolve: the GP's sizes, operators and initial formulas."""
    g.add_argument("--generations", type=int, help=_default("generations"))
    g.add_argument("--population", type=int, help=_default("population"))
    g.add_argument("--seed", type=int, help=f"fixes the whole search (default {_default('seed')})")
    g.add_argument(
        "--cx-prob", type=float, help=f"subtree crossover probability per pair ({_default('cx_prob')})"
    )
    g.add_argument(
        "--mut-prob",
        type=float,
        help=f"mutation probability per child: subtree/point/shrink ({_default('mut_prob')})",
    )
    g.add_argument("--tournament", type=int, help=f"tournament size ({_default('tournament')})")
    g.add_argument(
        "--elite",
        type=int,
        help=f"best distinct formulas kept unchanged each generation ({_default('elite')})",
    )
    g.add_argument("--hof-size", type=int, help=f"hall of fame size ({_default('hof_size')})")
    g.add_argument(
        "--init-depth",
        help="ramped half-and-half depth range MIN:MAX "
        f"({_default('init_min_depth')}:{_default('init_max_depth')})",
    )
    g.add_argument("--max-depth", type=int, help=f"bloat control: deepest tree ({_default('max_depth')})")
    g.add_argument("--max-size", type=int, help=f"bloat control: most nodes ({_default('max_size')})")
    g.add_argument(
        "--seed-formulas",
        help=f"initial formulas: comma list of known names or formula texts, or none ({DEFAULT_SEEDS})",
    )


def _fitness_flags(f) -> None:
    """How a formula is judged: settings, data, the ladder's budgets, the final check."""
    f.add_argument(
        "--settings",
        help=f"sparsity settings the fitness averages over: comma list of ratios and N:M ({_default('settings')})",
    )
    f.add_argument("--sparsity", type=float, help="one unstructured setting instead of --settings")
    f.add_argument("--pattern", help="one N:M setting instead of --settings, e.g. 2:4")
    f.add_argument("--group", help=f"row or matrix ({_default('group')})")
    f.add_argument(
        "--update",
        help="weight update after each candidate's mask: none, obs (SparseGPT's update for a fixed "
        "mask: the search then looks for the best mask for that update) or adaptive (the candidate "
        "re-chooses each span's mask inside that update: the search looks for a selection criterion "
        f"like SparseGPT's) ({_default('update')})",
    )
    f.add_argument(
        "--top-rung",
        choices=TOP_RUNGS,
        help="how the top rung prunes: one-shot (every linear from the dense model's statistics, as the "
        "lower rungs), sequential (the pruning core's sequential driver, the protocol users prune with "
        "and the final check measures; ~4x the cost on CPU) or one-pass (that driver at one pass per "
        "block, each linear pruned as its input arrives: ranks formulas as sequential does at about half "
        f"its calibration cost, but judges Wanda ~5%% worse) ({_default('top_rung')})",
    )
    f.add_argument("--calib", help=f"calibration corpus ({_default('calib')})")
    f.add_argument("--nsamples", type=int, help=f"calibration windows ({_default('nsamples')})")
    f.add_argument("--seqlen", type=int, help=f"calibration window length ({_default('seqlen')})")
    f.add_argument("--calib-seed", type=int, help=f"calibration sampling seed ({_default('calib_seed')})")
    f.add_argument("--fitness-data", help=f"fitness corpus ({_default('fitness_data')})")
    f.add_argument(
        "--fitness-windows",
        type=int,
        help=f"perplexity windows of the base rung ({_default('fitness_windows')})",
    )
    f.add_argument(
        "--top-windows", type=int, help=f"perplexity windows of the top rung ({_default('top_windows')})"
    )
    f.add_argument(
        "--fitness-seqlen", type=int, help=f"tokens per fitness window ({_default('fitness_seqlen')})"
    )
    f.add_argument(
        "--window-order",
        choices=WINDOW_ORDERS,
        help="which fitness windows the rungs read: spread (evenly over the whole corpus, so a few "
        f"articles cannot decide) or first (the first ones, as earlier runs) ({_default('window_order')})",
    )
    f.add_argument(
        "--fitness-batch", type=int, help=f"fitness windows per forward pass ({_default('fitness_batch')})"
    )
    f.add_argument("--no-multi-fidelity", action="store_true", help="every new formula gets base perplexity")
    f.add_argument(
        "--confirm", type=int, help=f"formulas per generation given base perplexity ({_default('confirm')})"
    )
    f.add_argument(
        "--promote",
        type=int,
        help=f"formulas per generation promoted to the top rung ({_default('promote')})",
    )
    f.add_argument(
        "--tune",
        type=int,
        help=f"constant-tuning variants per generation of the top-rung formula with the fewest steps measured "
        f"({_default('tune')}; 0: off)",
    )
    f.add_argument(
        "--final-top",
        type=int,
        help=f"hall-of-fame formulas checked against Wanda at the end ({_default('final_top')}; 0: none)",
    )
    f.add_argument(
        "--final-windows",
        type=int,
        help=f"WikiText-2 valid windows of that final check ({_default('final_windows')})",
    )


def _execution_flags(r) -> None:
    """How to run (a resume may change these): actors, Ray, time limits, run folders."""
    r.add_argument(
        "--workers",
        type=int,
        help=f"evaluator actors (cpu {PROFILES['cpu'].execution.workers}; with GPUs or --address: every GPU x "
        "--actors-per-gpu, or on CPUs as many --threads actors as the cluster holds)",
    )
    r.add_argument(
        "--actors-per-gpu",
        type=int,
        help=f"actors sharing each GPU, each reserving 1/N of it ({_default('actors_per_gpu')})",
    )
    r.add_argument("--threads", type=int, help=f"torch threads per actor ({_default('threads')})")
    r.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: local Ray on loopback)")
    r.add_argument(
        "--runtime-env",
        metavar="FILE.json",
        help="a Ray runtime_env for every actor, for cluster nodes without the package "
        '(e.g. {"pip": ["metric-search"]} or {"working_dir": "."})',
    )
    r.add_argument(
        "--candidate-timeout", type=float, help=f"seconds per candidate ({_default('candidate_timeout')})"
    )
    r.add_argument("--no-preflight", action="store_true", help="skip loading the model in the driver first")
    r.add_argument("--run-dir", help="run directory (default runs/<run-id>)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def explicit_flags(parser, argv: list[str]) -> set[str]:
    """Destinations of the options written on the command line (abbreviations are disabled)."""
    given = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(token == option or token.startswith(option + "=") for token in argv):
                given.add(action.dest)
    return given


def _init_depth(text: str | None, search: SearchSettings) -> tuple[int, int]:
    if text is None:
        return search.init_min_depth, search.init_max_depth
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--init-depth must be MIN:MAX with integers (e.g. 1:3), got {text!r}")
    return int(parts[0]), int(parts[1])


def _given(args, table: dict[str, str]) -> dict:
    """The fields of ``table`` the command line sets; a flag left out keeps the profile's value."""
    return {field: getattr(args, dest) for dest, field in table.items() if getattr(args, dest) is not None}


def split_formulas(text: str | None) -> list[str]:
    """Split on commas outside parentheses, so 'wanda,add(W, X)' is two items; 'none' is no item."""
    if text is None:
        text = DEFAULT_SEEDS
    if text.strip() in ("", "none"):
        return []
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    if any(not item for item in items):
        raise UsageError(
            f"--seed-formulas has an empty item in {text!r}; e.g. --seed-formulas wanda,magnitude"
        )
    return items


def resolve_seed_formulas(items: list[str]) -> tuple[str, ...]:
    from primitives import KNOWN_FORMULAS, parse_formula

    texts = []
    for item in items:
        text = KNOWN_FORMULAS.get(item, item)
        parse_formula(text)  # hostile or broken text stops here, as one line
        texts.append(text)
    return tuple(texts)


def settings_from_args(args) -> SearchSettings:
    from pruning_core.data import CORPORA

    profile = PROFILES[args.profile].search
    evaluator = replace(
        profile.evaluator, **_given(args, EVALUATOR_FIELDS), model=args.model, dtype=args.dtype,
        device=args.device, cache_dir=args.cache_dir, data_dir=args.data_dir,
        patterns=_patterns(args, profile.evaluator.patterns),
    )  # fmt: skip
    for flag, name in (("--calib", evaluator.calib), ("--fitness-data", evaluator.fitness_data)):
        if name not in CORPORA:
            raise UsageError(f"unknown {flag} {name!r}; choose one of: {', '.join(CORPORA)}")
    min_depth, max_depth = _init_depth(args.init_depth, profile)
    settings = replace(
        profile, **_given(args, SEARCH_FIELDS), init_min_depth=min_depth, init_max_depth=max_depth,
        seed_formulas=resolve_seed_formulas(split_formulas(args.seed_formulas)),
        multi_fidelity=not args.no_multi_fidelity, evaluator=evaluator,
    )  # fmt: skip
    check_search(settings)
    return settings


def _patterns(args, default: tuple[str, ...]) -> tuple[str, ...]:
    """--settings, or one setting from --sparsity / --pattern (not both kinds at once); else ``default``."""
    from pruning_core.masks import parse_pattern, parse_settings

    single = args.sparsity is not None or args.pattern is not None
    if single and args.settings is not None:
        raise UsageError("pass either --settings or --sparsity/--pattern, not both")
    if not single:
        return default if args.settings is None else parse_settings(args.settings)
    sparsity, n, m = parse_pattern(args.pattern, 0.5 if args.sparsity is None else args.sparsity)
    return parse_settings(f"{n}:{m}" if m else f"{sparsity}")


def execution_from_args(args, device: str | None) -> ExecutionSettings:
    profile = PROFILES[args.profile].execution
    use_gpu = _uses_gpu(device)
    workers = args.workers
    if workers is None and args.address is None and not use_gpu:  # a local CPU run: the profile's count
        workers = profile.workers  # else every GPU x --actors-per-gpu, or the CPUs / --threads
    execution = replace(
        profile,
        **_given(args, EXECUTION_FIELDS),
        workers=workers,
        address=args.address,
        runtime_env=cluster.load_runtime_env(args.runtime_env),
        use_gpu=use_gpu,
        preflight=not args.no_preflight,
        progress=not (args.quiet or args.json),
    )
    check_execution(execution)
    return execution


def _uses_gpu(device: str | None) -> bool:
    if device:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def resume_settings(args, given: set[str]):
    from metric_search.config import with_generations
    from metric_search.results import load_run

    run = load_run(args.resume, "--resume")
    fresh = settings_from_args(args)  # also checks every flag's value
    saved = run.settings
    for dest in sorted(given - RESUMABLE):
        mine, theirs = _flag_value(fresh, dest), _flag_value(saved, dest)
        if mine != theirs:
            flag = "--" + dest.replace("_", "-")
            raise UsageError(
                f"{flag} {mine} differs from the run's {theirs}; a resume continues the same search "
                f"(drop {flag}, or start a new run)"
            )
    settings = saved
    if "generations" in given:
        done = run.state.generation + 1
        if fresh.generations < done:
            raise UsageError(f"--generations {fresh.generations} is less than the {done} the run has done")
        settings = with_generations(saved, fresh.generations)
    # Where and how to run may change on resume; a flag not given keeps the run's own value.
    overrides = {field: getattr(fresh.evaluator, field) for field in ("device", "dtype", "cache_dir", "data_dir")
                 if field in given}  # fmt: skip
    if "candidate_timeout" in given:
        overrides["timeout_s"] = fresh.evaluator.timeout_s
    return run, replace(settings, evaluator=replace(settings.evaluator, **overrides))


def _flag_value(settings: SearchSettings, dest: str):
    evaluator = settings.evaluator
    mapping = {
        "pattern": evaluator.patterns, "sparsity": evaluator.patterns, "settings": evaluator.patterns,
        "init_depth": (settings.init_min_depth, settings.init_max_depth),
        "no_multi_fidelity": not settings.multi_fidelity, "seed_formulas": settings.seed_formulas,
    }  # fmt: skip
    if dest in mapping:
        return mapping[dest]
    if dest in SEARCH_FIELDS:
        return getattr(settings, SEARCH_FIELDS[dest])
    if dest in EVALUATOR_FIELDS:
        return getattr(evaluator, EVALUATOR_FIELDS[dest])
    return getattr(evaluator, dest)  # --model
