"""`python -m pruning_core {eval,prune,scorers}`."""

from __future__ import annotations

import resource
import sys

from pruning_core.cli_common import OneLineParser, add_model_flags, emit, run_cli
from pruning_core.errors import UsageError
from pruning_core.spec import check_group

DEFAULT_EVAL_DATA = "wikitext2-test"


def peak_memory_mb() -> dict:
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import torch

    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _check_eval_flags(args) -> None:
    from pruning_core.data import CORPORA

    if args.max_windows is not None and args.max_windows < 1:
        raise UsageError(f"--max-windows must be >= 1, got {args.max_windows}")
    tasks = getattr(args, "tasks", None) or getattr(args, "eval_tasks", None)
    if tasks:
        from pruning_core.zeroshot import parse_tasks

        parse_tasks(tasks)  # fail on a bad task name before the model loads
    for name in filter(None, [getattr(args, "data", None), getattr(args, "eval", None)]):
        if name not in CORPORA:
            raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(CORPORA)}")


def eval_dataset(args) -> str | None:
    """Perplexity runs when --data is given or no --tasks are asked for (WikiText-2 test by default);
    zero-shot alone skips it, since a whole WikiText-2 test pass takes about half an hour on CPU."""
    if args.data is not None:
        return args.data
    return None if args.tasks else DEFAULT_EVAL_DATA


def _evaluation(args, data: str | None, tasks: str | None):
    from pruning_core.pipeline import Evaluation

    return Evaluation(data, args.seqlen, args.max_windows, args.batch_size, tasks, args.limit)


def _source(args):
    from pruning_core.pipeline import ModelSource

    return ModelSource(args.model, args.dtype, args.device, args.cache_dir)


def cmd_eval(args) -> int:
    from pruning_core.pipeline import evaluate

    _check_eval_flags(args)
    dataset = eval_dataset(args)
    model, tokenizer = _source(args).load()
    result = {"model": args.model}
    result.update(
        evaluate(model, tokenizer, _evaluation(args, dataset, args.tasks), args.data_dir, not args.json)
    )
    lines = []
    if dataset:
        result.update(data=dataset, seqlen=args.seqlen)
        lines.append(
            f"{args.model} {dataset} seqlen {args.seqlen}: ppl {result['ppl']:.4f} "
            f"over {result['windows']} windows ({result['seconds']:.1f} s)"
        )
    if args.tasks:
        lines.append(f"{args.model} zero-shot {args.tasks}: {_mean_acc_text(result['zeroshot'])}")
    result.update(peak_memory_mb())
    emit(result, args.json, "\n".join(lines))
    return 0


def _mean_acc_text(zeroshot: dict) -> str:
    mean = zeroshot["mean_acc"]
    return "no accuracy reported" if mean is None else f"mean acc {mean:.4f}"


def prune_job(args):
    """The PruneJob that ``prune``'s flags describe, and its resolved scorer (plugins loaded)."""
    from pruning_core.masks import parse_pattern
    from pruning_core.pipeline import PruneJob
    from pruning_core.plugins import add_plugin_dir
    from pruning_core.pruning import Calibration, Owl
    from pruning_core.scorers import SparsitySpec, resolve_scorer
    from pruning_core.updates import with_update

    _check_eval_flags(args)
    sparsity, n, m = parse_pattern(args.pattern, args.sparsity)
    if args.plugins:
        add_plugin_dir(args.plugins)
    scorer = with_update(resolve_scorer(args.scorer, args.formula, args.group), args.update)
    spec = SparsitySpec(sparsity, n, m, check_group(args.group or scorer.default_group, "--group"))
    calibration = Calibration(
        args.calib,
        args.nsamples,
        args.seqlen,
        args.seed,
        batch_size=args.calib_batch_size,
        offload=args.offload_activations,
        one_pass=args.one_pass,
    )
    job = PruneJob(
        spec, _source(args), args.scorer, args.formula, args.update, calibration,
        Owl(args.owl_m, args.owl_lambda) if args.owl else None, _evaluation(args, args.eval, args.eval_tasks),
        args.data_dir, progress=not args.json,
    )  # fmt: skip
    return job, scorer


def cmd_prune(args) -> int:
    from pruning_core.pipeline import prune_and_evaluate

    job, scorer = prune_job(args)
    model, tokenizer, outcome = prune_and_evaluate(job, scorer)
    spec = job.spec
    result = {
        "model": args.model, "scorer": scorer.name, "formula": args.formula, "sparsity_target": spec.sparsity,
        "pattern": spec.describe(), "group": spec.group, "update": args.update, "calib": args.calib,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "owl": args.owl,
        **{k: outcome[k] for k in ("sparsity", "per_linear", "block_sparsities", "seconds_calibration",
                                   "seconds_prune", "seconds_total_prune")},
    }  # fmt: skip
    if args.eval:
        result.update(
            eval=args.eval,
            ppl=outcome["ppl"],
            eval_windows=outcome["windows"],
            seconds_eval=outcome["seconds"],
        )
    if args.eval_tasks:
        result["zeroshot"] = outcome["zeroshot"]
    if args.save:
        from pruning_core.save import save_pruned

        save_pruned(model, tokenizer, args.save, {k: v for k, v in result.items() if k != "per_linear"})
        result["saved"] = args.save
    result.update(peak_memory_mb())
    ppl_text = f", {args.eval} ppl {result['ppl']:.4f}" if args.eval else ""
    emit(
        result,
        args.json,
        f"{scorer.name} {spec.describe()} ({spec.group}): sparsity "
        f"{result['sparsity']:.4f}{ppl_text}, prune {result['seconds_prune']:.1f} s",
    )
    return 0


def cmd_scorers(args) -> int:
    from pruning_core.plugins import add_plugin_dir, load_plugins
    from pruning_core.scorers import registered

    if args.plugins:
        add_plugin_dir(args.plugins)
    load_plugins()
    rows = [
        {
            "name": s.name,
            "stats": list(s.stats),
            "default_group": s.default_group,
            "reference": s.reference,
            "kind": "solver" if hasattr(s, "prune") else ("plugin" if hasattr(s, "provenance") else "scorer"),
        }
        for s in sorted(registered().values(), key=lambda s: s.name)
    ]
    lines = [
        f"{r['name']:<16} {r['kind']:<7} stats={','.join(r['stats']) or '-':<10} "
        f"group={r['default_group']:<7} {r['reference']}"
        for r in rows
    ]
    emit({"scorers": rows}, args.json, "\n".join(lines))
    return 0


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m pruning_core", description="Prune and evaluate HF decoders.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def eval_flags(p, default_windows=None):
        p.add_argument("--seqlen", type=int, default=512)
        p.add_argument(
            "--max-windows", type=int, default=default_windows, help="evaluate only the first N windows"
        )
        p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
        p.add_argument("--limit", type=int, default=None, help="zero-shot: documents per task")

    ev = sub.add_parser("eval", help="perplexity (and zero-shot accuracy) of a model")
    add_model_flags(ev)
    ev.add_argument(
        "--data",
        default=None,
        help=f"perplexity on wikitext2-test, wikitext2-valid or c4 (default {DEFAULT_EVAL_DATA}, "
        "skipped when only --tasks is given)",
    )
    ev.add_argument(
        "--tasks", default=None, help="zero-shot tasks: 'zeroshot' or a comma list (arc_easy,boolq)"
    )
    eval_flags(ev)
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("prune", help="prune a model layer by layer, evaluate, save")
    add_model_flags(pr)
    pr.add_argument("--scorer", default=None, help="a scorer name (see `scorers`)")
    pr.add_argument("--formula", default=None, help="a formula over W, X, G, H, U, e.g. 'abs(W) * X'")
    pr.add_argument("--plugins", default=None, help="a directory with scorer plugin .json files")
    pr.add_argument("--sparsity", type=float, default=0.5)
    pr.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4")
    pr.add_argument("--group", default=None, help="row or matrix (default: the scorer's paper)")
    pr.add_argument(
        "--update",
        default="none",
        help="weight update after the scorer's mask: none, obs (SparseGPT's sequential update), "
        "refit (exact least squares of the kept weights per row) or adaptive (the scorer re-chooses "
        "each span's mask inside the obs update, as SparseGPT's own criterion)",
    )
    pr.add_argument("--calib", default="c4")
    pr.add_argument("--nsamples", type=int, default=128)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--calib-batch-size", type=int, default=8)
    pr.add_argument("--offload-activations", action="store_true", help="keep calibration activations on CPU")
    pr.add_argument(
        "--one-pass",
        action="store_true",
        help="one pass per block over all calibration windows at once, each linear pruned from the input it "
        "receives (after the linears before it in the block; GPTQ's true-sequential order); holds every "
        "calibration window's activations at once",
    )
    pr.add_argument("--owl", action="store_true", help="outlier-weighted layer-wise sparsity (OWL)")
    pr.add_argument("--owl-m", type=float, default=5.0)
    pr.add_argument("--owl-lambda", type=float, default=0.08)
    pr.add_argument("--eval", default=None, help="dataset to evaluate after pruning, e.g. wikitext2-test")
    pr.add_argument("--eval-tasks", default=None, help="zero-shot tasks after pruning")
    pr.add_argument("--save", default=None, help="save the pruned model here (HF format + pruning.json)")
    eval_flags(pr)
    pr.set_defaults(func=cmd_prune)

    sc = sub.add_parser("scorers", help="list scorers, solvers and plugins")
    sc.add_argument("--plugins", default=None)
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=cmd_scorers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry(argv=None) -> None:
    sys.exit(run_cli(main, argv))
