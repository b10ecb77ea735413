"""Build an Evaluator from plain settings (what a Ray actor receives): model, calibration, fitness data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fitness.evaluator import Evaluator, FitnessConfig
from fitness.stats_cache import CalibrationKey, StatsCache
from pruning_core.models import cache_dir, load_model
from pruning_core.scorers.base import SparsitySpec


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
    seed: int = 0
    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    group: str = "row"
    fitness_data: str = "wikitext2-valid"
    fitness_windows: int = 4
    fitness_seqlen: int = 256
    timeout_s: float = 600.0

    def as_dict(self) -> dict:
        return asdict(self)


def build_evaluator(settings: EvaluatorSettings, progress: bool = False) -> Evaluator:
    model, tokenizer = load_model(settings.model, settings.dtype, settings.device, settings.cache_dir)
    key = CalibrationKey(settings.calib, settings.nsamples, settings.calib_seqlen, settings.seed)
    stats = StatsCache.load_or_compute(
        model, tokenizer, key, cache_dir(settings.cache_dir), settings.data_dir, progress=progress
    )
    config = FitnessConfig(
        SparsitySpec(settings.sparsity, settings.n, settings.m, settings.group),
        settings.fitness_data,
        settings.fitness_windows,
        settings.fitness_seqlen,
        settings.timeout_s,
    )
    return Evaluator(model, tokenizer, stats, config, settings.data_dir)
