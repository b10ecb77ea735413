"""Search settings: the two documented profiles, value checks (one-line errors), and JSON round trip.

``SearchSettings`` define a run (saved in config.json; a resume must not change them, except
``generations`` to extend a run). ``ExecutionSettings`` say how to run it (workers, cluster, timeouts)
and may differ between a run and its resume without changing the result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from fitness.evaluator import TOP_RUNGS
from fitness.setup import EvaluatorSettings
from fitness.windows import WINDOW_ORDERS
from pruning_core.errors import UsageError
from pruning_core.masks import parse_settings
from pruning_core.spec import check_group

CONFIG_VERSION = 2  # 2: several sparsity settings, a three-rung fidelity ladder, the final check
SEARCH_UPDATES = ("none", "obs", "adaptive")  # weight updates cheap enough for the fitness loop

BASELINES = ("wanda", "magnitude", "pruner-zero")
# A baseline climbs to the top rung when its base perplexity is within this factor of Wanda's (the reference
# of every ratio): magnitude's (~3x Wanda's on the default model) would take a whole round of the pool's
# workers to confirm what the base rung already shows.
TOP_BASELINE_FACTOR = 1.5


@dataclass(frozen=True)
class SearchSettings:
    generations: int
    population: int
    seed: int = 0
    cx_prob: float = 0.6
    mut_prob: float = 0.3
    tournament: int = 3
    elite: int = 2
    hof_size: int = 10
    init_min_depth: int = 2
    init_max_depth: int = 3
    max_depth: int = 6
    max_size: int = 24
    seed_formulas: tuple[str, ...] = ()
    multi_fidelity: bool = True
    confirm: int = 3
    promote: int = 1
    tune: int = 1
    final_top: int = 2
    final_windows: int = 16
    evaluator: EvaluatorSettings = EvaluatorSettings()

    def as_dict(self) -> dict:
        data = asdict(self)
        data["seed_formulas"] = list(self.seed_formulas)
        return data


@dataclass(frozen=True)
class ExecutionSettings:
    workers: int | None = 2  # None: as many as the Ray cluster holds (see cluster.actor_layout)
    threads: int = 1
    actors_per_gpu: int = 1
    address: str | None = None
    runtime_env: dict | None = None  # a Ray runtime_env for every actor (--runtime-env FILE.json)
    candidate_timeout: float = 300.0
    use_gpu: bool = False
    preflight: bool = True
    progress: bool = True

    @property
    def hard_timeout(self) -> float:
        """The dispatcher kills an actor only after the evaluator's own deadline had its chance."""
        return self.candidate_timeout + max(10.0, 0.25 * self.candidate_timeout)


@dataclass(frozen=True)
class Profile:
    """One documented set of defaults: what to search and how to run it. The search's flags, their help
    text and their values when left out all read these instances."""

    search: SearchSettings
    execution: ExecutionSettings


def _profile(search: SearchSettings, execution: ExecutionSettings) -> Profile:
    """The evaluator's own deadline is the execution's candidate timeout: one number, set once."""
    evaluator = replace(search.evaluator, timeout_s=execution.candidate_timeout)
    return Profile(replace(search, evaluator=evaluator), execution)


# CPU profile: the README's main command on smollm2-135m (18-20 min per seed on one 2-core machine, a
# top-rung formula ~95 s with both workers busy). It searches the mask for SparseGPT's OBS update at 50%: on
# this model no mask alone beats Wanda's outside the noise at 50%, while masks for the update do
# (`sqrt(X) * abs(W)`, 0.96 of Wanda+obs held out in 2 of 3 seeds), and one setting per search finds more
# than the mean over 50% and 2:4 (README, "One setting per search").
# Fitness follows the validation protocol (512-token windows); the ladder: the proxy screens every new
# formula, the best `confirm` per generation get perplexity on `fitness_windows`, the best `promote` of
# those (if among the best quarter so far) climb to `top_windows` in batches of `promote` (one per worker; a
# short batch waits a generation), pruned by the sequential driver at one pass per block (`one-pass`: the
# protocol users prune with at half its calibration cost); `tune` variants (one constant changed) of a
# formula at the top rung (the one with the fewest steps measured) go up the ladder per generation and join
# only if they beat it at the top rung; at the end the best `final_top` other than Wanda go through the
# sequential driver on `final_windows` further windows of WikiText-2 valid, paired with Wanda (given the same
# update; ~1.5 min per formula here, so one and Wanda). Rung budgets are multiples of the two workers, so no
# rung leaves one idle. On 2 CPU cores a batch of fitness windows is no faster than one at a time.
CPU_PROFILE = _profile(
    SearchSettings(
        generations=7, population=20, confirm=4, promote=2, tune=2, final_top=1, final_windows=16,
        evaluator=EvaluatorSettings(
            nsamples=16, calib_seqlen=512, fitness_windows=2, top_windows=8, fitness_seqlen=512,
            patterns=("0.5",), update="obs", top_rung="one-pass", batch_size=1,
        ),
    ),
    ExecutionSettings(workers=2, threads=1, actors_per_gpu=1, candidate_timeout=300.0),
)  # fmt: skip
# GPU profile: --actors-per-gpu actors on every GPU of the machine or the cluster (unless --workers), a larger
# population, more calibration and more fitness windows, so perplexity differences between candidates
# are well above window-to-window noise.
GPU_PROFILE = _profile(
    SearchSettings(
        generations=50, population=64, confirm=8, promote=3, tune=4, final_top=5, final_windows=64,
        evaluator=EvaluatorSettings(
            nsamples=128, calib_seqlen=512, fitness_windows=16, top_windows=64, fitness_seqlen=512,
            patterns=("0.5", "2:4"), top_rung="sequential", batch_size=8,
        ),
    ),
    ExecutionSettings(workers=None, threads=4, actors_per_gpu=1, candidate_timeout=600.0),
)  # fmt: skip
PROFILES = {"cpu": CPU_PROFILE, "gpu": GPU_PROFILE}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def check_search(settings: SearchSettings) -> None:
    """Every value in range, or one line naming the flag and the fix."""
    s = settings
    _check(s.generations >= 1, f"--generations must be >= 1, got {s.generations}")
    _check(s.population >= 2, f"--population must be >= 2, got {s.population}")
    for flag, value in (("--cx-prob", s.cx_prob), ("--mut-prob", s.mut_prob)):
        _check(math.isfinite(value) and 0.0 <= value <= 1.0, f"{flag} must be in [0, 1], got {value}")
    _check(
        1 <= s.tournament <= s.population,
        f"--tournament must be between 1 and --population ({s.population}), got {s.tournament}",
    )
    _check(0 <= s.elite < s.population, f"--elite must be in [0, --population), got {s.elite}")
    _check(s.hof_size >= 1, f"--hof-size must be >= 1, got {s.hof_size}")
    _check(
        1 <= s.init_min_depth <= s.init_max_depth,
        f"--init-depth must be MIN:MAX with 1 <= MIN <= MAX, got {s.init_min_depth}:{s.init_max_depth}",
    )
    _check(
        s.max_depth >= s.init_max_depth,
        f"--max-depth ({s.max_depth}) must be >= the initial depth limit ({s.init_max_depth})",
    )
    _check(s.max_size >= 3, f"--max-size must be >= 3, got {s.max_size}")
    _check(s.confirm >= 1, f"--confirm must be >= 1, got {s.confirm}")
    _check(s.promote >= 1, f"--promote must be >= 1, got {s.promote}")
    _check(s.tune >= 0, f"--tune must be >= 0 (0: no constant tuning), got {s.tune}")
    _check(s.final_top >= 0, f"--final-top must be >= 0 (0 skips the final check), got {s.final_top}")
    _check(s.final_windows >= 1, f"--final-windows must be >= 1, got {s.final_windows}")
    e = s.evaluator
    _check(bool(e.patterns), "--settings is empty; pass e.g. --settings 0.5,2:4")
    _check(
        parse_settings(",".join(e.patterns)) == e.patterns,
        f"--settings {','.join(e.patterns)} is not a list of distinct settings like 0.5,2:4",
    )
    _check(e.nsamples >= 1, f"--nsamples must be >= 1, got {e.nsamples}")
    _check(e.calib_seqlen >= 8, f"--seqlen must be >= 8, got {e.calib_seqlen}")
    _check(e.fitness_windows >= 1, f"--fitness-windows must be >= 1, got {e.fitness_windows}")
    _check(
        e.top_windows >= e.fitness_windows,
        f"--top-windows ({e.top_windows}) must be >= --fitness-windows ({e.fitness_windows})",
    )
    _check(e.fitness_seqlen >= 8, f"--fitness-seqlen must be >= 8, got {e.fitness_seqlen}")
    _check(e.batch_size >= 1, f"--fitness-batch must be >= 1, got {e.batch_size}")
    _check(
        e.fitness_data != "wikitext2-test" and e.calib != "wikitext2-test",
        "wikitext2-test is for reported numbers only; search on wikitext2-valid or c4 (--fitness-data, --calib)",
    )
    check_group(e.group, "--group")
    _check(e.top_rung in TOP_RUNGS, f"--top-rung {e.top_rung!r}: use one of {', '.join(TOP_RUNGS)}")
    _check(e.window_order in WINDOW_ORDERS, f"--window-order {e.window_order!r}: use spread or first")
    _check(
        e.update in SEARCH_UPDATES,
        f"--update {e.update!r} is not available to the search; use none, obs or adaptive (refit is too slow "
        "for the fitness loop: search with obs, then prune with `--update refit`)",
    )


def check_execution(execution: ExecutionSettings) -> None:
    x = execution
    _check(x.workers is None or x.workers >= 1, f"--workers must be >= 1, got {x.workers}")
    _check(x.actors_per_gpu >= 1, f"--actors-per-gpu must be >= 1, got {x.actors_per_gpu}")
    _check(x.threads >= 1, f"--threads must be >= 1, got {x.threads}")
    _check(
        math.isfinite(x.candidate_timeout) and x.candidate_timeout > 0,
        f"--candidate-timeout must be a positive number of seconds, got {x.candidate_timeout}",
    )


def settings_from_dict(data: dict, origin: str) -> SearchSettings:
    """Rebuild settings from config.json; anything unexpected is one line naming the file."""
    try:
        evaluator_fields = {f.name for f in fields(EvaluatorSettings)}
        evaluator = data["evaluator"]
        if isinstance(evaluator, dict) and "seed" in evaluator and "calib_seed" not in evaluator:
            evaluator = {
                ("calib_seed" if k == "seed" else k): v for k, v in evaluator.items()
            }  # config.json of earlier runs
        if isinstance(evaluator, dict) and "window_order" not in evaluator:
            evaluator = {**evaluator, "window_order": "first"}  # earlier runs read the first windows
        if not isinstance(evaluator, dict) or set(evaluator) - evaluator_fields:
            raise ValueError("evaluator")
        search_fields = {f.name for f in fields(SearchSettings)} - {"evaluator"}
        values = {k: v for k, v in data.items() if k in search_fields}
        if set(data) - search_fields - {"evaluator"}:
            raise ValueError("unknown fields")
        values["seed_formulas"] = tuple(str(t) for t in values.get("seed_formulas", ()))
        evaluator = {**evaluator, "patterns": tuple(str(p) for p in evaluator.get("patterns", ()))}
        settings = SearchSettings(**values, evaluator=EvaluatorSettings(**evaluator))
        _check_types(settings)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{origin} is not a valid metric_search config ({err}); start a new run") from err
    _check_seed_formulas(settings, origin)
    return settings


def _check_seed_formulas(settings: SearchSettings, origin: str) -> None:
    """A config is data: its seed formulas go through the grammar before anything uses them."""
    from primitives import parse_formula

    for text in settings.seed_formulas:
        try:
            parse_formula(text)
        except UsageError as err:
            raise UsageError(
                f"{origin} holds a seed formula the grammar rejects ({err}); start a new run"
            ) from err


def _check_types(settings: SearchSettings) -> None:
    for f in fields(SearchSettings):
        value = getattr(settings, f.name)
        kind = {"int": int, "float": (int, float), "bool": bool}.get(str(f.type))
        if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise TypeError(f"{f.name} has type {type(value).__name__}")


def with_generations(settings: SearchSettings, generations: int) -> SearchSettings:
    return replace(settings, generations=generations)
