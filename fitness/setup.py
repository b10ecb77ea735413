"""Build an Evaluator from plain settings (what a Ray actor receives): model, calibration, fitness data,
read from this machine's files, or from a ``Shipment`` the driver prepared once (on a cluster it travels
through Ray's object store, so a worker node needs only the installed package)."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fitness.evaluator import Evaluator, FitnessConfig, FitnessInputs
from fitness.stats_cache import StatsCache
from fitness.windows import search_windows
from pruning_core.data import corpus_tokens
from pruning_core.masks import setting_spec
from pruning_core.models import cache_dir, load_model, resolve_device, resolve_dtype
from pruning_core.perplexity import make_windows
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


@dataclass
class Shipment:
    """Everything an evaluator reads from files, prepared once: the model (float32, on CPU, with its
    buffers and tied weights, as pickling keeps them), the statistics and the fitness token ids."""

    model: torch.nn.Module
    stats: dict[str, torch.Tensor]
    hessian_of: dict[str, str]
    inputs: FitnessInputs


def _calibration(settings: EvaluatorSettings) -> Calibration:
    return Calibration(settings.calib, settings.nsamples, settings.calib_seqlen, settings.calib_seed)


def _fitness_config(settings: EvaluatorSettings) -> FitnessConfig:
    return FitnessConfig(
        settings.specs,
        settings.fitness_data,
        settings.fitness_windows,
        settings.fitness_seqlen,
        settings.timeout_s,
        settings.top_windows,
        settings.update,
        settings.top_rung,
        _calibration(settings),
        settings.batch_size,
        settings.window_order,
    )


def fitness_inputs(tokenizer, settings: EvaluatorSettings) -> FitnessInputs:
    """The fitness windows the rungs read (see fitness.windows) and, for a sequential top rung, the
    calibration corpus."""
    root = cache_dir(settings.cache_dir)
    corpus = make_windows(
        corpus_tokens(tokenizer, settings.fitness_data, settings.data_dir, root), settings.fitness_seqlen
    )
    count = max(settings.fitness_windows, settings.top_windows)
    windows = corpus[search_windows(corpus.shape[0], count, settings.window_order)]
    calib = None
    if settings.top_rung != "one-shot":
        calib = corpus_tokens(tokenizer, settings.calib, settings.data_dir, root)
    return FitnessInputs(windows, calib)


def build_evaluator(
    settings: EvaluatorSettings, progress: bool = False, shipment: Shipment | None = None
) -> Evaluator:
    """From this machine's files (computing and caching the statistics once), or from ``shipment``."""
    if shipment is not None:
        device = resolve_device(settings.device)
        model = shipment.model.to(device=device, dtype=resolve_dtype(settings.dtype, device))
        stats = StatsCache({k: v.to(device) for k, v in shipment.stats.items()}, shipment.hessian_of)
        # a worker given everything writes nothing under its cache dir: the snapshot goes to the temp dir
        scratch = Path(tempfile.gettempdir())
        return Evaluator(model, stats, _fitness_config(settings), shipment.inputs, scratch)
    model, tokenizer = load_model(settings.model, settings.dtype, settings.device, settings.cache_dir)
    stats = StatsCache.load_or_compute(
        model, tokenizer, _calibration(settings), cache_dir(settings.cache_dir), settings.data_dir, progress
    )
    inputs = fitness_inputs(tokenizer, settings)
    # on the CPU the dense-weight snapshot is a file: in the cache dir, on disk (a temp dir may be tmpfs)
    return Evaluator(
        model, stats, _fitness_config(settings), inputs, cache_dir(settings.cache_dir) / "scratch"
    )


def prepare_shipment(settings: EvaluatorSettings, progress: bool = False) -> Shipment:
    """What ``build_evaluator`` needs from files, read (and the statistics computed or loaded from the
    cache) on this machine, on its GPU when it has one: float32, whatever dtype the actors compute in."""
    device = "cuda" if torch.cuda.is_available() and settings.device != "cpu" else "cpu"
    model, tokenizer = load_model(settings.model, "float32", device, settings.cache_dir)
    stats = StatsCache.load_or_compute(
        model, tokenizer, _calibration(settings), cache_dir(settings.cache_dir), settings.data_dir, progress
    )
    return Shipment(
        model.to("cpu"),
        {k: v.cpu() for k, v in stats.tensors.items()},
        stats.hessian_of,
        fitness_inputs(tokenizer, settings),
    )
