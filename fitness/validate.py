"""Final validation of a formula: the pruning core's sequential driver (statistics recomputed block by
block on the pruned prefix) and perplexity on WikiText-2 test, the reported-numbers split."""

from __future__ import annotations

from pruning_core.data import load_rows, tokenize_corpus
from pruning_core.models import cache_dir, load_model
from pruning_core.perplexity import make_windows, perplexity
from pruning_core.pruning import calibrate_and_prune
from pruning_core.scorers import SparsitySpec, resolve_scorer
from pruning_core.updates import with_update


def validate_scorer(
    model_spec: str,
    spec: SparsitySpec,
    *,
    scorer_name: str | None = None,
    formula: str | None = None,
    calib: str = "c4",
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    eval_data: str = "wikitext2-test",
    max_windows: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    data_dir=None,
    cache=None,
    progress: bool = False,
    tasks: str | None = None,
    limit: int | None = None,
    update: str = "none",
) -> dict:
    """Prune a fresh copy of the model with a named scorer or a formula and return its test ppl (and,
    with ``tasks``, its zero-shot accuracies, ``limit`` documents per task), after the weight update
    ``update`` (see pruning_core.updates)."""
    scorer = with_update(resolve_scorer(scorer_name, formula, spec.group), update)
    model, tokenizer = load_model(model_spec, dtype, device, cache)
    calib_tokens = tokenize_corpus(tokenizer, load_rows(calib, data_dir))
    report = calibrate_and_prune(
        model,
        scorer,
        spec,
        calib_tokens,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        calib_name=calib,
        cache_root=cache_dir(cache),
        progress=progress,
    )
    windows = make_windows(tokenize_corpus(tokenizer, load_rows(eval_data, data_dir)), seqlen, max_windows)
    result = perplexity(model, windows, progress=progress)
    validation = {
        "scorer": scorer_name or formula,
        "pattern": spec.describe(),
        "update": update,
        "ppl": result["ppl"],
        "windows": result["windows"],
        "sparsity": report["sparsity"],
    }
    if tasks:
        from pruning_core.zeroshot import evaluate_zeroshot

        validation["zeroshot"] = evaluate_zeroshot(model, tokenizer, tasks, limit=limit, data_dir=data_dir)
    return validation
