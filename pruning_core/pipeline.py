"""One pruning job, start to finish: load the model, calibrate and prune it with the sequential driver,
measure it (perplexity, zero-shot). The prune CLI and ``metric_search validate`` describe what they
want as a ``PruneJob`` and call ``prune_and_evaluate``; ``evaluate`` measures any model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pruning_core.pruning import Calibration, Owl, calibrate_and_prune
from pruning_core.spec import SparsitySpec


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: an embedded name, a local directory, a .gguf file or a hub id."""

    name: str = "smollm2-135m"
    dtype: str | None = None
    device: str | None = None
    cache_dir: str | None = None

    def load(self):
        from pruning_core.models import load_model

        return load_model(self.name, self.dtype, self.device, self.cache_dir)


@dataclass(frozen=True)
class Evaluation:
    """What to measure after pruning: perplexity on ``data`` (None: none) and zero-shot ``tasks``."""

    data: str | None = "wikitext2-test"
    seqlen: int = 512
    max_windows: int | None = None  # the first N windows only
    batch_size: int = 1  # windows per forward pass
    tasks: str | None = None
    limit: int | None = None  # zero-shot documents per task


@dataclass(frozen=True)
class PruneJob:
    spec: SparsitySpec
    source: ModelSource = field(default_factory=ModelSource)
    scorer: str | None = None  # a registered scorer's name, or
    formula: str | None = None  # a formula text
    update: str = "none"  # weight update with the scorer's mask (pruning_core.updates)
    calibration: Calibration = field(default_factory=Calibration)
    owl: Owl | None = None
    evaluation: Evaluation = field(default_factory=Evaluation)
    data_dir: str | None = None
    progress: bool = False

    def resolved_scorer(self):
        from pruning_core.scorers import resolve_scorer
        from pruning_core.updates import with_update

        return with_update(resolve_scorer(self.scorer, self.formula, self.spec.group), self.update)


def evaluate(model, tokenizer, evaluation: Evaluation, data_dir=None, progress: bool = False) -> dict:
    """Perplexity (ppl, nll, tokens, windows, seconds) on ``evaluation.data`` and, with tasks, the
    zero-shot accuracies under "zeroshot"."""
    result = {}
    if evaluation.data:
        from pruning_core.data import corpus_tokens
        from pruning_core.perplexity import check_seqlen, make_windows, perplexity

        check_seqlen(model, evaluation.seqlen)
        tokens = corpus_tokens(tokenizer, evaluation.data, data_dir)
        windows = make_windows(tokens, evaluation.seqlen, evaluation.max_windows)
        result.update(perplexity(model, windows, evaluation.batch_size, progress=progress))
    if evaluation.tasks:
        from pruning_core.zeroshot import evaluate_zeroshot, parse_tasks

        result["zeroshot"] = evaluate_zeroshot(
            model, tokenizer, parse_tasks(evaluation.tasks), limit=evaluation.limit, data_dir=data_dir
        )
    return result


def prune_and_evaluate(job: PruneJob, scorer=None):
    """Run ``job`` (``scorer``: an already resolved one, else the job's); return (model, tokenizer,
    result) with the calibration report, the measured sparsity and the evaluation."""
    from pruning_core.data import corpus_tokens
    from pruning_core.models import cache_dir
    from pruning_core.perplexity import check_seqlen

    scorer = scorer or job.resolved_scorer()
    model, tokenizer = job.source.load()
    check_seqlen(model, job.calibration.seqlen)
    started = time.perf_counter()
    calib = corpus_tokens(tokenizer, job.calibration.data, job.data_dir, cache_dir(job.source.cache_dir))
    report = calibrate_and_prune(
        model, scorer, job.spec, calib, job.calibration, owl=job.owl,
        cache_root=cache_dir(job.source.cache_dir), progress=job.progress,
    )  # fmt: skip
    report["seconds_total_prune"] = time.perf_counter() - started
    report["scorer"] = scorer.name
    measured = evaluate(model, tokenizer, job.evaluation, job.data_dir, job.progress)
    return model, tokenizer, {**report, **measured}
