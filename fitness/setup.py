"""Build an Evaluator from plain settings (what a Ray actor receives): model, calibration, fitness data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fitness.evaluator import Evaluator, FitnessConfig
from fitness.stats_cache import StatsCache
from pruning_core.masks import setting_spec
from pruning_core.models import cache_dir, load_model
from pruning_core.pruning import Calibration


@dataclass(frozen=True)
class EvaluatorSettings:
    model: str = "smollm2-135m"
    dtype: str | None = None
    device: str | None = None
    cache_dir: str | None = None
    data_dir: str | None = None
    calib: str = "c4"
    nsamples: int = 32
    calib_seqlen: int = 256
    calib_seed: int = 0  # which calibration windows are drawn (the search's own seed is SearchSettings.seed)
    patterns: tuple[str, ...] = ("0.5",)  # sparsity settings, each '0.5' or '2:4'; fitness averages them
    group: str = "row"
    fitness_data: str = "wikitext2-valid"
    fitness_windows: int = 4
    top_windows: int = 16
    fitness_seqlen: int = 256
    timeout_s: float = 600.0
    update: str = "none"  # weight update with each candidate's mask: none, obs or adaptive
    top_rung: str = "one-shot"  # "sequential" / "one-pass": the top rung prunes with the core's driver
    batch_size: int = 1  # fitness windows per forward pass
    window_order: str = "spread"  # which fitness-corpus windows the rungs read: spread or first

    def as_dict(self) -> dict:
        data = asdict(self)
        data["patterns"] = list(self.patterns)
        return data

    @property
    def specs(self):
        return tuple(setting_spec(label, self.group) for label in self.patterns)


def resolved_numbers(settings: EvaluatorSettings) -> dict:
    """The device type and dtype this machine would compute with: results of a run are comparable
    only under one of each (a resume that would change them is refused)."""
    from pruning_core.models import resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    return {"device": device.type, "dtype": str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")}


def build_evaluator(settings: EvaluatorSettings, progress: bool = False) -> Evaluator:
    model, tokenizer = load_model(settings.model, settings.dtype, settings.device, settings.cache_dir)
    key = Calibration(settings.calib, settings.nsamples, settings.calib_seqlen, settings.calib_seed)
    stats = StatsCache.load_or_compute(
        model, tokenizer, key, cache_dir(settings.cache_dir), settings.data_dir, progress=progress
    )
    config = FitnessConfig(
        settings.specs,
        settings.fitness_data,
        settings.fitness_windows,
        settings.fitness_seqlen,
        settings.timeout_s,
        settings.top_windows,
        settings.update,
        settings.top_rung,
        key,
        settings.batch_size,
        settings.window_order,
    )
    return Evaluator(model, tokenizer, stats, config, settings.data_dir, cache_dir(settings.cache_dir))
