"""Command-line flags -> settings: the search parser, the CPU / GPU profile defaults, seed formulas,
and what a ``--resume`` may change (how to run) or must keep (what to search)."""

from __future__ import annotations

from dataclasses import replace

from fitness.evaluator import TOP_RUNGS
from fitness.windows import WINDOW_ORDERS
from metric_search import cluster
from metric_search.config import (
    DEFAULT_SETTINGS,
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


# Defaults that do not depend on the profile: the settings dataclasses' own (help text and pick read them).
SEARCH_DEFAULTS = SearchSettings(generations=0, population=0)
EVALUATOR_DEFAULTS = SEARCH_DEFAULTS.evaluator


def _both(name: str) -> str:
    """Help text of a profile default, from the profiles themselves (so it cannot drift)."""
    return ", ".join(
        f"{profile} {values[name]:g}"
        if isinstance(values[name], int | float)
        else f"{profile} {values[name]}"
        for profile, values in PROFILES.items()
    )


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
    g.add_argument("--generations", type=int, help=_both("generations"))
    g.add_argument("--population", type=int, help=_both("population"))
    g.add_argument("--seed", type=int, help=f"fixes the whole search (default {SEARCH_DEFAULTS.seed})")
    g.add_argument(
        "--cx-prob", type=float, help=f"subtree crossover probability per pair ({SEARCH_DEFAULTS.cx_prob:g})"
    )
    g.add_argument(
        "--mut-prob",
        type=float,
        help=f"mutation probability per child: subtree/point/shrink ({SEARCH_DEFAULTS.mut_prob:g})",
    )
    g.add_argument("--tournament", type=int, help=f"tournament size ({SEARCH_DEFAULTS.tournament})")
    g.add_argument(
        "--elite",
        type=int,
        help=f"best distinct formulas kept unchanged each generation ({SEARCH_DEFAULTS.elite})",
    )
    g.add_argument("--hof-size", type=int, help=f"hall of fame size ({SEARCH_DEFAULTS.hof_size})")
    g.add_argument(
        "--init-depth",
        help="ramped half-and-half depth range MIN:MAX "
        f"({SEARCH_DEFAULTS.init_min_depth}:{SEARCH_DEFAULTS.init_max_depth})",
    )
    g.add_argument("--max-depth", type=int, help=f"bloat control: deepest tree ({SEARCH_DEFAULTS.max_depth})")
    g.add_argument("--max-size", type=int, help=f"bloat control: most nodes ({SEARCH_DEFAULTS.max_size})")
    g.add_argument(
        "--seed-formulas",
        help=f"initial formulas: comma list of known names or formula texts, or none ({DEFAULT_SEEDS})",
    )


def _fitness_flags(f) -> None:
    """How a formula is judged: settings, data, the ladder's budgets, the final check."""
    f.add_argument(
        "--settings",
        help=f"sparsity settings the fitness averages over: comma list of ratios and N:M ({DEFAULT_SETTINGS})",
    )
    f.add_argument("--sparsity", type=float, help="one unstructured setting instead of --settings")
    f.add_argument("--pattern", help="one N:M setting instead of --settings, e.g. 2:4")
    f.add_argument("--group", help=f"row or matrix ({EVALUATOR_DEFAULTS.group})")
    f.add_argument(
        "--update",
        help="weight update after each candidate's mask: none, obs (SparseGPT's update for a fixed "
        "mask: the search then looks for the best mask for that update) or adaptive (the candidate "
        "re-chooses each span's mask inside that update: the search looks for a selection criterion "
        f"like SparseGPT's) ({EVALUATOR_DEFAULTS.update})",
    )
    f.add_argument(
        "--top-rung",
        choices=TOP_RUNGS,
        help="how the top rung prunes: one-shot (every linear from the dense model's statistics, as the "
        "lower rungs), sequential (the pruning core's sequential driver, the protocol users prune with "
        "and the final check measures; ~4x the cost on CPU) or one-pass (that driver at one pass per "
        "block, each linear pruned as its input arrives: ranks formulas as sequential does at about half "
        f"its calibration cost, but judges Wanda ~5%% worse) ({_both('top_rung')})",
    )
    f.add_argument("--calib", help=f"calibration corpus ({EVALUATOR_DEFAULTS.calib})")
    f.add_argument("--nsamples", type=int, help=f"calibration windows ({_both('nsamples')})")
    f.add_argument("--seqlen", type=int, help=f"calibration window length ({_both('seqlen')})")
    f.add_argument(
        "--calib-seed", type=int, help=f"calibration sampling seed ({EVALUATOR_DEFAULTS.calib_seed})"
    )
    f.add_argument("--fitness-data", help=f"fitness corpus ({EVALUATOR_DEFAULTS.fitness_data})")
    f.add_argument(
        "--fitness-windows",
        type=int,
        help=f"perplexity windows of the base rung ({_both('fitness_windows')})",
    )
    f.add_argument(
        "--top-windows", type=int, help=f"perplexity windows of the top rung ({_both('top_windows')})"
    )
    f.add_argument(
        "--fitness-seqlen", type=int, help=f"tokens per fitness window ({_both('fitness_seqlen')})"
    )
    f.add_argument(
        "--window-order",
        choices=WINDOW_ORDERS,
        help="which fitness windows the rungs read: spread (evenly over the whole corpus, so a few "
        f"articles cannot decide) or first (the first ones, as earlier runs) ({EVALUATOR_DEFAULTS.window_order})",
    )
    f.add_argument(
        "--fitness-batch", type=int, help=f"fitness windows per forward pass ({_both('fitness_batch')})"
    )
    f.add_argument("--no-multi-fidelity", action="store_true", help="every new formula gets base perplexity")
    f.add_argument(
        "--confirm", type=int, help=f"formulas per generation given base perplexity ({_both('confirm')})"
    )
    f.add_argument(
        "--promote", type=int, help=f"formulas per generation promoted to the top rung ({_both('promote')})"
    )
    f.add_argument(
        "--tune",
        type=int,
        help=f"constant-tuning variants per generation of the best formula at the top rung with untried steps "
        f"({_both('tune')}; 0: off)",
    )
    f.add_argument(
        "--final-top",
        type=int,
        help=f"hall-of-fame formulas checked against Wanda at the end ({_both('final_top')}; 0: none)",
    )
    f.add_argument(
        "--final-windows",
        type=int,
        help=f"WikiText-2 valid windows of that final check ({_both('final_windows')})",
    )


def _execution_flags(r) -> None:
    """How to run (a resume may change these): actors, Ray, time limits, run folders."""
    r.add_argument(
        "--workers",
        type=int,
        help=f"evaluator actors (cpu {PROFILES['cpu']['workers']}; with GPUs or --address: every GPU x "
        "--actors-per-gpu, or on CPUs as many --threads actors as the cluster holds)",
    )
    r.add_argument(
        "--actors-per-gpu",
        type=int,
        help=f"actors sharing each GPU, each reserving 1/N of it ({_both('actors_per_gpu')})",
    )
    r.add_argument("--threads", type=int, help=f"torch threads per actor ({_both('threads')})")
    r.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT (default: local Ray on loopback)")
    r.add_argument(
        "--runtime-env",
        metavar="FILE.json",
        help="a Ray runtime_env for every actor, for cluster nodes without the package "
        '(e.g. {"pip": ["metric-search"]} or {"working_dir": "."})',
    )
    r.add_argument(
        "--candidate-timeout", type=float, help=f"seconds per candidate ({_both('candidate_timeout')})"
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


def _init_depth(text: str | None) -> tuple[int, int]:
    if text is None:
        return SEARCH_DEFAULTS.init_min_depth, SEARCH_DEFAULTS.init_max_depth
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--init-depth must be MIN:MAX with integers (e.g. 1:3), got {text!r}")
    return int(parts[0]), int(parts[1])


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
    from fitness.setup import EvaluatorSettings
    from pruning_core.data import CORPORA

    profile = PROFILES[args.profile]

    def pick(name, default):
        value = getattr(args, name)
        return default if value is None else value

    patterns = _patterns(args)
    for flag, name in (
        ("--calib", pick("calib", EVALUATOR_DEFAULTS.calib)),
        ("--fitness-data", pick("fitness_data", EVALUATOR_DEFAULTS.fitness_data)),
    ):
        if name not in CORPORA:
            raise UsageError(f"unknown {flag} {name!r}; choose one of: {', '.join(CORPORA)}")
    evaluator = EvaluatorSettings(
        model=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir, data_dir=args.data_dir,
        calib=pick("calib", EVALUATOR_DEFAULTS.calib), nsamples=pick("nsamples", profile["nsamples"]),
        calib_seqlen=pick("seqlen", profile["seqlen"]), calib_seed=pick("calib_seed", EVALUATOR_DEFAULTS.calib_seed), patterns=patterns,
        group=pick("group", EVALUATOR_DEFAULTS.group), fitness_data=pick("fitness_data", EVALUATOR_DEFAULTS.fitness_data),
        fitness_windows=pick("fitness_windows", profile["fitness_windows"]),
        top_windows=pick("top_windows", profile["top_windows"]),
        fitness_seqlen=pick("fitness_seqlen", profile["fitness_seqlen"]),
        timeout_s=pick("candidate_timeout", profile["candidate_timeout"]), update=pick("update", EVALUATOR_DEFAULTS.update),
        top_rung=pick("top_rung", profile["top_rung"]),
        batch_size=pick("fitness_batch", profile["fitness_batch"]),
        window_order=pick("window_order", EVALUATOR_DEFAULTS.window_order),
    )  # fmt: skip
    min_depth, max_depth = _init_depth(args.init_depth)
    defaults = SEARCH_DEFAULTS
    settings = SearchSettings(
        generations=pick("generations", profile["generations"]),
        population=pick("population", profile["population"]),
        seed=pick("seed", defaults.seed), cx_prob=pick("cx_prob", defaults.cx_prob),
        mut_prob=pick("mut_prob", defaults.mut_prob), tournament=pick("tournament", defaults.tournament),
        elite=pick("elite", defaults.elite), hof_size=pick("hof_size", defaults.hof_size),
        init_min_depth=min_depth, init_max_depth=max_depth, max_depth=pick("max_depth", defaults.max_depth),
        max_size=pick("max_size", defaults.max_size),
        seed_formulas=resolve_seed_formulas(split_formulas(args.seed_formulas)),
        multi_fidelity=not args.no_multi_fidelity, confirm=pick("confirm", profile["confirm"]),
        promote=pick("promote", profile["promote"]), tune=pick("tune", profile["tune"]), final_top=pick("final_top", profile["final_top"]),
        final_windows=pick("final_windows", profile["final_windows"]), evaluator=evaluator,
    )  # fmt: skip
    check_search(settings)
    return settings


def _patterns(args) -> tuple[str, ...]:
    """--settings, or one setting from --sparsity / --pattern (not both kinds at once)."""
    from pruning_core.masks import parse_pattern, parse_settings

    single = args.sparsity is not None or args.pattern is not None
    if single and args.settings is not None:
        raise UsageError("pass either --settings or --sparsity/--pattern, not both")
    if not single:
        return parse_settings(DEFAULT_SETTINGS if args.settings is None else args.settings)
    sparsity, n, m = parse_pattern(args.pattern, 0.5 if args.sparsity is None else args.sparsity)
    return parse_settings(f"{n}:{m}" if m else f"{sparsity}")


def execution_from_args(args, device: str | None) -> ExecutionSettings:
    profile = PROFILES[args.profile]

    def pick(name):
        value = getattr(args, name)
        return profile[name] if value is None else value

    use_gpu = _uses_gpu(device)
    workers = args.workers
    if workers is None and args.address is None and not use_gpu:  # a local CPU run: the profile's count
        workers = profile.get("workers")  # else every GPU x --actors-per-gpu, or the CPUs / --threads
    execution = ExecutionSettings(
        workers=workers,
        threads=pick("threads"),
        actors_per_gpu=pick("actors_per_gpu"),
        address=args.address,
        runtime_env=cluster.load_runtime_env(args.runtime_env),
        candidate_timeout=pick("candidate_timeout"),
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
        "seqlen": evaluator.calib_seqlen, "calib_seed": evaluator.calib_seed, "pattern": evaluator.patterns,
        "sparsity": evaluator.patterns, "settings": evaluator.patterns, "init_depth": (settings.init_min_depth, settings.init_max_depth),
        "no_multi_fidelity": not settings.multi_fidelity, "seed_formulas": settings.seed_formulas,
    }  # fmt: skip
    if dest in mapping:
        return mapping[dest]
    if hasattr(settings, dest):
        return getattr(settings, dest)
    return getattr(evaluator, dest)
