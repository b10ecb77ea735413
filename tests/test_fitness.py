"""The fitness evaluator: exact restore, equality with the core's one-shot Wanda, bad candidates, memo.
A damaged statistics cache is tested in test_reliability_faults.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from mask_reference import stable_keep

from fitness.memo import Memo
from fitness.setup import EvaluatorSettings, build_evaluator
from primitives.scorer import FormulaScorer
from pruning_core.blocks import prunable_linears
from pruning_core.data import calibration_windows, load_rows, tokenize_corpus
from pruning_core.models import load_model
from pruning_core.perplexity import make_windows, perplexity
from pruning_core.scorers import SparsitySpec, get_scorer
from pruning_core.sequential import Walk, prune_model


@pytest.fixture(scope="module")
def stats_cache_dir(tmp_path_factory):
    """One statistics cache for the module: every test's tiny model has the same weights, so the
    statistics are computed once (they are keyed by the weights, not the model's path)."""
    return tmp_path_factory.mktemp("fitness-cache")


@pytest.fixture
def settings(tiny_model_dir, stats_cache_dir):
    return EvaluatorSettings(
        model=str(tiny_model_dir("llama")),
        cache_dir=str(stats_cache_dir),
        nsamples=4,
        calib_seqlen=32,
        fitness_windows=3,
        fitness_seqlen=32,
    )


def dense_weights(settings) -> dict[str, torch.Tensor]:
    """The prunable weights of a fresh load of the settings' model (the evaluator prunes its own)."""
    model, _ = load_model(settings.model)
    return {name: linear.weight.detach() for name, linear in prunable_linears(model).items()}


def spread_windows(tokenizer, read: int, order: list[int]) -> torch.Tensor:
    """The fitness windows a rung reads, by the rule written out: of all 32-token windows of WikiText-2
    valid, the middles of ``read`` equal slices; ``order`` picks which of those (by position) and how many."""
    corpus = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-valid")), 32)
    total = corpus.shape[0]
    middles = [(2 * j + 1) * total // (2 * read) for j in range(read)]
    return corpus[[middles[i] for i in order]]


class FixedScorer:
    """A candidate whose scores come from a function of W, to inject faults."""

    stats = ()
    default_group = "row"

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def score(self, weight, stats):
        return self.fn(weight)


@pytest.mark.parametrize("kept_in", ["file", "memory"])
def test_evaluate_restores_weights_bit_identical(settings, kept_in, tmp_path):
    """After candidates of every kind (two settings, a weight update, one that fails half-way through
    masking, the proxy) the model equals a fresh load of it, whether the dense snapshot is a scratch
    file (the CPU's) or held in memory; the linears' weights are their stacks' (no second copy)."""
    from fitness.evaluator import Evaluator
    from fitness.setup import _calibration, _fitness_config, fitness_inputs
    from fitness.snapshot import FileSnapshot, MemorySnapshot
    from fitness.stats_cache import StatsCache
    from pruning_core.models import cache_dir

    settings = replace(settings, patterns=("0.5", "2:4"))
    model, tokenizer = load_model(settings.model)
    stats = StatsCache.load_or_compute(
        model, tokenizer, _calibration(settings), cache_dir(settings.cache_dir), None, False
    )
    scratch = tmp_path / "scratch" if kept_in == "file" else None
    evaluator = Evaluator(
        model, stats, _fitness_config(settings), fitness_inputs(tokenizer, settings), scratch
    )
    assert isinstance(evaluator.snapshot, FileSnapshot if kept_in == "file" else MemorySnapshot)
    for stack in evaluator.stacks:
        for index, name in enumerate(stack.names):
            assert evaluator.linears[name].weight.data_ptr() == stack.weights[index].data_ptr(), name
    # the failing candidate masks the first stack, then gives NaN scores in the second
    assert len(evaluator.stacks) >= 2
    first_stack, calls = len(evaluator.stacks[0].names), []

    def fails_after_the_first_stack(weight):
        calls.append(1)
        return weight.abs() if len(calls) <= first_stack else torch.full_like(weight, math.nan)

    fresh = {k: v.clone() for k, v in load_model(settings.model)[0].state_dict().items()}
    for scorer, fidelity in (
        (get_scorer("wanda"), "ppl"),
        (get_scorer("wanda"), "proxy"),
        (FixedScorer("fails", fails_after_the_first_stack), "ppl"),
    ):
        result = evaluator.evaluate(scorer, fidelity)
        assert (scorer.name == "fails") == (result["reason"] == "nonfinite"), result
        for key, value in model.state_dict().items():
            assert torch.equal(value, fresh[key]), (scorer.name, fidelity, key)
    evaluator.config = replace(evaluator.config, update="obs")
    assert math.isfinite(evaluator.evaluate(get_scorer("wanda"))["fitness"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh[key]), ("obs", key)


@pytest.mark.parametrize("order", ["spread", "first"])
def test_wanda_fitness_equals_the_core_one_shot_wanda(settings, order):
    """On the base rung's windows: 3 of the top rung's 16 spread ones (halves, then a quarter), or the
    first 3 windows (``first``, as runs before the setting)."""
    evaluator = build_evaluator(replace(settings, window_order=order))
    got = evaluator.evaluate(get_scorer("wanda"))["fitness"]

    model, tokenizer = load_model(settings.model)
    calib = calibration_windows(tokenize_corpus(tokenizer, load_rows("c4")), 4, 32, 0)
    prune_model(
        model, get_scorer("wanda"), SparsitySpec(0.5), calib, walk=Walk(sequential=False, progress=False)
    )
    if order == "spread":
        windows = spread_windows(tokenizer, 16, [0, 8, 4])
    else:
        windows = make_windows(tokenize_corpus(tokenizer, load_rows("wikitext2-valid")), 32, 3)
    expected = perplexity(model, windows, progress=False)["ppl"]
    assert got == pytest.approx(expected, rel=1e-6)


def test_several_settings_give_the_geometric_mean_of_one_shot_perplexities(settings):
    """Each rung's per-setting value is the core's one-shot Wanda perplexity on that rung's windows;
    the fitness is their geometric mean."""
    settings = replace(settings, patterns=("0.5", "2:4"), fitness_windows=2, top_windows=3)
    evaluator = build_evaluator(settings)
    model, tokenizer = load_model(settings.model)
    calib = calibration_windows(tokenize_corpus(tokenizer, load_rows("c4")), 4, 32, 0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    for fidelity, order in (("ppl", [0, 2]), ("top", [0, 1, 2])):  # the base rung: first and last third
        result = evaluator.evaluate(get_scorer("wanda"), fidelity)
        expected = {}
        for label, spec in (("0.5", SparsitySpec(0.5)), ("2:4", SparsitySpec(0.5, 2, 4))):
            model.load_state_dict(dense)
            prune_model(model, get_scorer("wanda"), spec, calib, walk=Walk(sequential=False, progress=False))
            expected[label] = perplexity(model, spread_windows(tokenizer, 3, order), progress=False)["ppl"]
        assert result["values"] == pytest.approx(expected, rel=1e-6)
        assert result["fitness"] == pytest.approx(math.sqrt(expected["0.5"] * expected["2:4"]), rel=1e-6)


def test_batched_fitness_windows_give_the_one_by_one_perplexities(settings):
    """``batch_size``: windows share forward passes (a GPU's throughput) with the same perplexities as
    one window at a time, to float tolerance; 3 windows in batches of 2 leave a partial last batch."""
    settings = replace(settings, patterns=("0.5", "2:4"), fitness_windows=3)
    one_by_one = build_evaluator(settings).evaluate(get_scorer("wanda"))
    batched = build_evaluator(replace(settings, batch_size=2)).evaluate(get_scorer("wanda"))
    assert batched["reason"] is None and batched["values"] == pytest.approx(one_by_one["values"], rel=1e-5)


@pytest.mark.parametrize(
    "top_rung, update", [("sequential", "none"), ("sequential", "adaptive"), ("one-pass", "none")]
)
def test_a_sequential_top_rung_equals_the_cores_sequential_driver(settings, top_rung, update):
    """``top_rung="sequential"``: the top rung's perplexity per setting is the core's sequential driver
    (each block's statistics from the pruned blocks before it) with the run's update, run here on a
    fresh model (``one-pass``: that driver with ``Calibration(one_pass=True)``); the lower rungs stay
    one-shot, and the evaluator's model comes back dense."""
    from primitives.scorer import FormulaScorer as Formula
    from pruning_core.pruning import Calibration, calibrate_and_prune
    from pruning_core.updates import with_update

    settings = replace(
        settings, patterns=("0.5", "2:4"), fitness_windows=2, top_windows=3, top_rung=top_rung,
        update=update,
    )  # fmt: skip
    evaluator = build_evaluator(settings)
    dense = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
    formula = "abs(W) * sqrt(X) + abs(W) * sqrt(G)"  # G: the top rung prunes with the cached gradients
    top = evaluator.evaluate(Formula(formula), "top")
    one_shot = evaluator.evaluate(Formula(formula), "ppl")
    assert all(torch.equal(v, dense[k]) for k, v in evaluator.model.state_dict().items())

    _, tokenizer = load_model(settings.model)
    calib_tokens = tokenize_corpus(tokenizer, load_rows("c4"))
    windows = spread_windows(tokenizer, 3, [0, 2, 1])
    expected, one_shot_top, one_shot_base = {}, {}, {}
    for label, spec in (("0.5", SparsitySpec(0.5)), ("2:4", SparsitySpec(0.5, 2, 4))):
        for sequential in (True, False):
            model, _ = load_model(settings.model)
            calibrate_and_prune(
                model, with_update(Formula(formula), update), spec, calib_tokens,
                Calibration("c4", 4, 32, 0, sequential=sequential, one_pass=top_rung == "one-pass"), progress=False,
            )  # fmt: skip
            if sequential:
                expected[label] = perplexity(model, windows, progress=False)["ppl"]
            else:
                one_shot_top[label] = perplexity(model, windows, progress=False)["ppl"]
                one_shot_base[label] = perplexity(model, windows[:2], progress=False)["ppl"]
    assert top["reason"] is None and top["values"] == pytest.approx(expected, rel=1e-5)
    assert one_shot["values"] == pytest.approx(one_shot_base, rel=1e-5)
    assert expected != pytest.approx(one_shot_top, rel=1e-3)  # the two protocols differ here


def test_an_evaluator_from_a_shipment_reads_no_file_and_equals_one_from_files(settings, tmp_path):
    """What the driver ships (pickled, as through Ray's object store) builds an evaluator whose settings
    name a model, cache and data folder that do not exist, and it scores as one built from the files."""
    import pickle

    from fitness.setup import prepare_shipment

    settings = replace(
        settings, patterns=("0.5", "2:4"), fitness_windows=2, top_windows=3, top_rung="sequential"
    )
    shipped = pickle.loads(pickle.dumps(prepare_shipment(settings)))
    void = tmp_path / "void"
    nowhere = replace(
        settings, model=str(void / "model"), cache_dir=str(void / "cache"), data_dir=str(void / "data")
    )
    from_shipment = build_evaluator(nowhere, shipment=shipped)
    from_files = build_evaluator(settings)
    assert not void.exists()  # nothing was written there (and nothing could be read)
    for formula, fidelity in [("abs(W) * sqrt(X)", "proxy"), ("abs(W) * G", "ppl"), ("abs(W) / H + X", "top"),
                              ("sqrt(G) * abs(W)", "top")]:  # fmt: skip
        got = from_shipment.evaluate(FormulaScorer(formula), fidelity)
        want = from_files.evaluate(FormulaScorer(formula), fidelity)
        assert got["reason"] is None and got["values"] == want["values"], (formula, fidelity)


@pytest.mark.parametrize(
    "fn, reason",
    [
        (lambda w: w / 0.0 * 0.0, "nonfinite"),
        (lambda w: torch.full_like(w, float("inf")), "nonfinite"),
        # one bad score among finite ones in each linear (the check reads only each group's max and min)
        (
            lambda w: w.abs().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(math.nan)),
            "nonfinite",
        ),
        (
            lambda w: w.abs().index_put_((torch.tensor([0]), torch.tensor([3])), torch.tensor(-math.inf)),
            "nonfinite",
        ),
        (
            lambda w: w.abs().index_put_((torch.tensor([2]), torch.tensor([1])), torch.tensor(math.inf)),
            "nonfinite",
        ),
        (lambda w: torch.ones_like(w), "constant"),
        (lambda w: w[:, :3], "error"),
        (lambda w: (_ for _ in ()).throw(RuntimeError("boom")), "error"),
    ],
)
def test_bad_candidates_get_inf_and_a_reason(settings, fn, reason):
    evaluator = build_evaluator(settings)
    before = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
    result = evaluator.evaluate(FixedScorer("bad", fn))
    assert result["fitness"] == math.inf and result["reason"] == reason
    assert all(torch.equal(v, before[k]) for k, v in evaluator.model.state_dict().items())


@pytest.mark.parametrize("fidelity", ["proxy", "ppl"])
def test_finite_scores_whose_sum_overflows_are_not_called_nonfinite(settings, fidelity):
    """Finite scores near float32's maximum, whose sums (max + min of a group included) overflow, are
    a valid candidate: the check must test each value's finiteness, not a sum's."""
    evaluator = build_evaluator(settings)
    huge = FixedScorer("huge", lambda w: torch.where(w > 0, 3e38, 1e38) + 0 * w)
    result = evaluator.evaluate(huge, fidelity)
    assert result["reason"] is None and math.isfinite(result["fitness"])


def test_timeout_is_a_reason(settings):
    evaluator = build_evaluator(settings)
    evaluator.config = replace(evaluator.config, timeout_s=0.0)
    result = evaluator.evaluate(get_scorer("wanda"))
    assert result["fitness"] == math.inf and result["reason"] == "timeout"


@pytest.mark.parametrize("group", ["row", "matrix"])
def test_proxy_equals_a_reference_loop_over_full_masks(settings, group):
    """Per setting: mean over linears of ||(W - W*mask) X||^2 / ||W X||^2 on the sampled rows, written
    with full masks and the Hessian from the statistics, as the proxy was defined. The built-in scores
    linear by linear, the elementwise formula only the sampled rows of each stack (the matrix setting:
    whole stacks), the matrix-wide formula whole matrices."""
    from pruning_core.masks import keep_mask

    settings = replace(settings, patterns=("0.5", "2:4", "0.7"), group=group)
    evaluator = build_evaluator(settings)
    weights = dense_weights(settings)
    for scorer in (
        get_scorer("wanda"),
        FormulaScorer("abs(W) * X + G"),
        FormulaScorer("colnorm(abs(W)) * X"),
    ):
        result = evaluator.evaluate(scorer, "proxy")
        for label, spec in zip(settings.patterns, settings.specs):
            errors = []
            for name in evaluator.linears:
                stats = evaluator.stats.linear_stats(name)
                dense = weights[name].double()
                keep = keep_mask(scorer.score(weights[name].float(), stats), spec)
                rows = evaluator.proxy_rows[name]
                w, removed = dense[rows], (dense * ~keep)[rows]
                hessian = stats["hessian"].double()
                errors.append(float(((removed @ hessian) * removed).sum() / ((w @ hessian) * w).sum()))
            assert result["values"][label] == pytest.approx(sum(errors) / len(errors), rel=1e-4), scorer.name


SETTINGS_4 = {
    "row": SparsitySpec(0.5, group="row"),
    "matrix": SparsitySpec(0.5, group="matrix"),
    "2:4": SparsitySpec(0.5, 2, 4),
    "4:8": SparsitySpec(0.5, 4, 8),
}


def test_stacked_masks_equal_per_linear_masks_for_every_known_formula(settings):
    """Scored and masked a stack at a time, every built-in formula leaves each linear its dense weight
    times the mask a stable sort gives its own scores, computed one 2-D linear at a time (row, matrix,
    2:4 and 4:8)."""
    from primitives.known import KNOWN_FORMULAS

    evaluator = build_evaluator(replace(settings, patterns=("0.5",)))
    weights = dense_weights(settings)
    for label, spec in SETTINGS_4.items():
        evaluator.config = replace(evaluator.config, specs=(spec,))
        for name, text in KNOWN_FORMULAS.items():
            scorer = FormulaScorer(text)
            with torch.no_grad():
                evaluator._prune(scorer, spec, deadline=math.inf, check=True)
            for linear, module in evaluator.linears.items():
                dense = weights[linear]
                scores = scorer.score(dense.clone(), evaluator.stats.linear_stats(linear))
                assert torch.equal(module.weight, dense * stable_keep(scores, spec)), (label, name, linear)
            evaluator.restore()


@pytest.mark.parametrize("label", list(SETTINGS_4))
def test_stacked_masks_on_the_default_models_shapes(label):
    """The default model's linear shapes (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536),
    three layers of each stacked, random weights and statistics: the same masks as one at a time."""
    from pruning_core.masks import keep_mask

    spec = SETTINGS_4[label]
    generator = torch.Generator().manual_seed(3)
    for shape in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        weights = torch.randn(3, *shape, generator=generator)
        stats = {
            "X": torch.rand(3, shape[1], generator=generator),
            "G": torch.rand(3, *shape, generator=generator),
        }
        scorer = FormulaScorer("abs(W) * X + G")
        keep = keep_mask(scorer.score(weights, stats), spec)
        for index in range(3):
            one = {"X": stats["X"][index], "G": stats["G"][index]}
            assert torch.equal(keep[index], stable_keep(scorer.score(weights[index], one), spec)), shape


def test_elementwise_formula_fitness_equals_perplexity_of_per_linear_masks(settings):
    """A stacked candidate's perplexity is that of the model with every linear masked on its own."""
    settings = replace(settings, patterns=("0.5", "2:4"))
    evaluator = build_evaluator(settings)
    scorer = FormulaScorer("abs(W) * X + G")
    result = evaluator.evaluate(scorer, "ppl")
    model, _ = load_model(settings.model)
    linears = dict(prunable_linears(model))
    for label, spec in zip(settings.patterns, settings.specs):
        with torch.no_grad():
            for name, dense in dense_weights(settings).items():
                scores = scorer.score(dense.clone(), evaluator.stats.linear_stats(name))
                linears[name].weight.copy_(dense * stable_keep(scores, spec))
        expected = perplexity(model, evaluator.windows_for("ppl"), progress=False)["ppl"]
        assert result["values"][label] == pytest.approx(expected, rel=1e-6)


def test_proxy_prefers_wanda_to_a_random_mask(settings):
    evaluator = build_evaluator(settings)
    wanda = evaluator.evaluate(get_scorer("wanda"), "proxy")["fitness"]
    generator = torch.Generator().manual_seed(1)
    noise = evaluator.evaluate(
        FixedScorer("noise", lambda w: torch.rand(w.shape, generator=generator)), "proxy"
    )
    assert 0 < wanda < noise["fitness"] < 1.5


def test_memo_persists_and_skips_torn_lines(tmp_path):
    path = tmp_path / "memo.jsonl"
    memo = Memo(path)
    memo.put("abs(W)*X", "ppl", {"fitness": 12.5, "reason": None})
    memo.put("W", "ppl", {"fitness": math.inf, "reason": "constant"})
    with open(path, "a") as fh:
        fh.write('{"canonical": "tor')
    again = Memo(path)
    assert len(again) == 2
    assert again.get("abs(W)*X", "ppl")["fitness"] == 12.5
    assert again.get("W", "ppl")["fitness"] == math.inf
    again.put("sqr(W)", "ppl", {"fitness": 3.0, "reason": None})
    assert Memo(path).get("sqr(W)", "ppl")["fitness"] == 3.0  # appended after the torn tail was dropped


def test_obs_update_fitness_equals_perplexity_of_independently_updated_weights(settings):
    """update=obs: every linear = SparseGPT's OBS update of its dense weight under the candidate's mask
    (one layer at a time here; the evaluator stacks layers of one shape), then the same windows."""
    from pruning_core.masks import keep_mask
    from pruning_core.scorers.sparsegpt import obs_prune_with_mask

    settings = replace(settings, patterns=("0.5", "2:4"), update="obs")
    evaluator = build_evaluator(settings)
    scorer = get_scorer("wanda")
    result = evaluator.evaluate(scorer, "ppl")

    model, _ = load_model(settings.model)
    linears = dict(prunable_linears(model))
    windows = evaluator.windows_for("ppl")
    for label, spec in zip(settings.patterns, settings.specs):
        with torch.no_grad():
            for name, dense in dense_weights(settings).items():
                stats = evaluator.stats.linear_stats(name)
                keep = keep_mask(scorer.score(dense.float(), stats), spec)
                linears[name].weight.copy_(obs_prune_with_mask(dense, stats["hessian"], keep))
        expected = perplexity(model, windows, progress=False)["ppl"]
        assert result["values"][label] == pytest.approx(expected, rel=1e-4)


def test_obs_update_proxy_is_the_output_error_of_the_updated_rows(settings):
    from pruning_core.masks import keep_mask
    from pruning_core.scorers.sparsegpt import obs_prune_with_mask

    settings = replace(settings, patterns=("0.5", "2:4"), update="obs")
    evaluator = build_evaluator(settings)
    scorer = get_scorer("wanda")
    result = evaluator.evaluate(scorer, "proxy")
    for label, spec in zip(settings.patterns, settings.specs):
        errors = []
        for name, dense in dense_weights(settings).items():
            stats = evaluator.stats.linear_stats(name)
            rows = evaluator.proxy_rows[name]
            keep = keep_mask(scorer.score(dense.float(), stats), spec)[rows]
            w = dense[rows].double()
            change = obs_prune_with_mask(dense[rows], stats["hessian"], keep).double() - w
            hessian = stats["hessian"].double()
            errors.append(float((change @ hessian * change).sum() / (w @ hessian * w).sum()))
        assert result["values"][label] == pytest.approx(sum(errors) / len(errors), rel=1e-4)


def test_adaptive_update_fitness_equals_perplexity_of_the_core_adaptive_prune(settings):
    """update=adaptive: every linear = ``prune --update adaptive`` of its dense weight, one layer at a
    time through the core (the evaluator stacks layers of one shape), then the same windows."""
    from pruning_core.sequential import prune_weight
    from pruning_core.updates import with_update

    settings = replace(settings, patterns=("0.5", "2:4"), update="adaptive")
    evaluator = build_evaluator(settings)
    scorer = FormulaScorer("abs(W) * X / H")
    result = evaluator.evaluate(scorer, "ppl")

    model, _ = load_model(settings.model)
    linears = dict(prunable_linears(model))
    adaptive = with_update(scorer, "adaptive")
    for label, spec in zip(settings.patterns, settings.specs):
        with torch.no_grad():
            for name, dense in dense_weights(settings).items():
                stats = evaluator.stats.linear_stats(name)
                linears[name].weight.copy_(
                    prune_weight(adaptive, dense, {"X": stats["X"], "hessian": stats["hessian"]}, spec)
                )
        expected = perplexity(model, evaluator.windows_for("ppl"), progress=False)["ppl"]
        assert result["values"][label] == pytest.approx(expected, rel=1e-4)


def test_adaptive_update_proxy_chooses_masks_on_the_sampled_rows_alone(settings):
    """The proxy's adaptive masks are the core's for the sampled rows as a layer of their own (their
    rows of G, the layer's X, H and Hessian)."""
    from pruning_core.sequential import prune_weight
    from pruning_core.updates import with_update

    settings = replace(settings, patterns=("0.5", "2:4"), update="adaptive")
    evaluator = build_evaluator(settings)
    scorer = FormulaScorer("abs(W) * X + G")
    result = evaluator.evaluate(scorer, "proxy")
    adaptive = with_update(scorer, "adaptive")
    for label, spec in zip(settings.patterns, settings.specs):
        errors = []
        for name, dense in dense_weights(settings).items():
            stats = evaluator.stats.linear_stats(name)
            rows = evaluator.proxy_rows[name]
            own = {"X": stats["X"], "G": stats["G"][rows], "hessian": stats["hessian"]}
            w = dense[rows].double()
            change = prune_weight(adaptive, dense[rows], own, spec).double() - w
            hessian = stats["hessian"].double()
            errors.append(float((change @ hessian * change).sum() / (w @ hessian * w).sum()))
        assert result["values"][label] == pytest.approx(sum(errors) / len(errors), rel=1e-4)
