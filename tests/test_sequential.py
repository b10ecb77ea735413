"""The sequential driver against independent computations on tiny random decoders."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from test_zpruner_owl import official_owl

from pruning_core.blocks import block_linears, find_blocks
from pruning_core.scorers import SparsitySpec, get_scorer
from pruning_core.sequential import Walk, prune_model, walk_blocks


def calib(seed=0, n=6, seqlen=24, vocab=320):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def reference_wanda_row_prune(weight, x_norm, sparsity):
    """Zero the k lowest |W| * ||X|| of every row, written independently of the library's masks."""
    scores = weight.abs() * x_norm
    k = round(sparsity * weight.shape[1])
    pruned = weight.clone()
    lowest = torch.topk(scores, k, dim=1, largest=False).indices
    pruned.scatter_(1, lowest, 0.0)
    return pruned


def naive_sequential_wanda(model, windows, sparsity):
    """For each block: run the WHOLE (partly pruned) model with hooks on that block's linears."""
    _, blocks = find_blocks(model)
    for block in blocks:
        sums, hooks = {}, []
        for name, linear in block_linears(block).items():
            sums[name] = torch.zeros(linear.in_features)

            def hook(_m, inputs, _o, name=name, sums=sums):
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                sums[name] += (x * x).sum(0)

            hooks.append(linear.register_forward_hook(hook))
        with torch.no_grad():
            for window in windows:
                model(window.unsqueeze(0))
        for h in hooks:
            h.remove()
        for name, linear in block_linears(block).items():
            linear.weight.data = reference_wanda_row_prune(linear.weight.data, sums[name].sqrt(), sparsity)
    return model


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_sequential_driver_matches_a_naive_whole_model_loop(arch):
    model = make_tiny_model(arch)
    windows = calib()
    expected = naive_sequential_wanda(copy.deepcopy(model), windows, 0.5)
    prune_model(
        model, get_scorer("wanda"), SparsitySpec(0.5), windows, walk=Walk(batch_size=4, progress=False)
    )
    for (name, got), (_, want) in zip(model.named_parameters(), expected.named_parameters()):
        assert torch.allclose(got, want, atol=1e-6), name


def naive_true_sequential_wanda(model, windows, sparsity):
    """For each linear in the order a block calls them: run the WHOLE model, the linears before it
    already pruned, with a hook on that linear alone; then prune it."""
    _, blocks = find_blocks(model)
    for block in blocks:
        for linear in block_linears(block).values():  # module order is call order in LLaMA and OPT
            total = torch.zeros(linear.in_features)

            def hook(_m, inputs, _o, total=total):
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                total += (x * x).sum(0)

            handle = linear.register_forward_hook(hook)
            with torch.no_grad():
                for window in windows:
                    model(window.unsqueeze(0))
            handle.remove()
            linear.weight.data = reference_wanda_row_prune(linear.weight.data, total.sqrt(), sparsity)
    return model


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_one_pass_driver_prunes_each_linear_from_the_input_it_receives(arch):
    """``Walk(one_pass=True)``: o_proj (out_proj) sees the pruned q/k/v, down (fc2) the pruned gate/up,
    every block the pruned blocks before it; the two-pass driver gives different weights here."""
    model = make_tiny_model(arch)
    windows = calib()
    expected = naive_true_sequential_wanda(copy.deepcopy(model), windows, 0.5)
    two_pass = copy.deepcopy(model)
    prune_model(
        model, get_scorer("wanda"), SparsitySpec(0.5), windows, walk=Walk(one_pass=True, progress=False)
    )
    prune_model(two_pass, get_scorer("wanda"), SparsitySpec(0.5), windows, walk=Walk(progress=False))
    for (name, got), (_, want) in zip(model.named_parameters(), expected.named_parameters()):
        assert torch.allclose(got, want, atol=1e-6), name
    assert any(not torch.equal(got, other) for got, other in zip(model.parameters(), two_pass.parameters()))


def test_driver_statistics_equal_direct_input_norms_and_hessian():
    """Every linear, including those that read the same input as another (k/v share q's, up shares
    gate's: the driver accumulates those once) gets the statistics of its own recorded inputs."""
    model = make_tiny_model("qwen2")
    windows = calib(n=5)
    _, blocks = find_blocks(model)
    linears = block_linears(blocks[0])
    inputs = {name: [] for name in linears}
    handles = [
        linear.register_forward_hook(
            lambda _m, args, _o, name=name: inputs[name].append(args[0].flatten(0, -2))
        )
        for name, linear in linears.items()
    ]
    with torch.no_grad():
        model(windows)
    for handle in handles:
        handle.remove()
    seen = {}

    def visit(v):
        if v.index == 0:
            seen.update(v.stats)

    walk_blocks(model, windows, ("X", "hessian"), visit, Walk(batch_size=2, progress=False))
    assert set(seen) == set(linears)
    for name in linears:
        x = torch.cat(inputs[name]).double()
        assert torch.allclose(seen[name]["X"].double(), x.pow(2).sum(0).sqrt(), rtol=1e-5), name
        assert torch.allclose(
            seen[name]["hessian"].double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6
        ), name
    # shared statistics are handed out as separate tensors: a scorer may not change another's
    assert seen["self_attn.k_proj"]["hessian"].data_ptr() != seen["self_attn.q_proj"]["hessian"].data_ptr()


def test_wanda_scores_are_abs_weight_times_input_norm():
    weight = torch.randn(8, 16)
    x = torch.rand(16)
    scores = get_scorer("wanda").score(weight, {"X": x})
    direct = torch.tensor([[abs(weight[i, j].item()) * x[j].item() for j in range(16)] for i in range(8)])
    assert torch.allclose(scores, direct)


def test_ria_and_pruner_zero_scores_follow_their_definitions():
    w, x, g = torch.randn(6, 10), torch.rand(10) + 0.1, torch.rand(6, 10)
    a = w.abs()
    ria = get_scorer("ria").score(w, {"X": x})
    for i in range(6):
        for j in range(10):
            expected = (a[i, j] / a[i].sum() + a[i, j] / a[:, j].sum()) * x[j].sqrt()
            assert torch.isclose(ria[i, j], expected, rtol=1e-5)
    pz = get_scorer("pruner-zero").score(w, {"G": g})
    mms = (g - g.min()) / (g.max() - g.min())
    assert torch.allclose(pz, w * w * mms, rtol=1e-5)


def test_tiny_mamba_prunes_and_evaluates_with_the_generic_driver():
    import transformers as tf

    from pruning_core.perplexity import perplexity

    torch.manual_seed(0)
    config = tf.MambaConfig(vocab_size=320, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2)
    model = tf.MambaForCausalLM(config).eval()
    windows = calib(n=4, seqlen=32)
    dense_ppl = perplexity(model, windows, progress=False)["ppl"]
    prune_model(model, get_scorer("wanda"), SparsitySpec(0.5), windows, walk=Walk(progress=False))
    _, blocks = find_blocks(model)
    names = set(block_linears(blocks[0]))
    assert {"mixer.in_proj", "mixer.x_proj", "mixer.out_proj"} <= names
    for block in blocks:
        for linear in block_linears(block).values():
            assert torch.all((linear.weight == 0).sum(1) == round(0.5 * linear.in_features))
    pruned_ppl = perplexity(model, windows, progress=False)["ppl"]
    assert pruned_ppl != dense_ppl and torch.isfinite(torch.tensor(pruned_ppl))


def dense_block_pairs(model, windows) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per block, (weight, ||X||) of each linear, from inputs captured on one pass of the dense model."""
    _, blocks = find_blocks(model)
    sums, hooks = {}, []
    for index, block in enumerate(blocks):
        for name, linear in block_linears(block).items():
            sums[index, name] = torch.zeros(linear.in_features, dtype=torch.float64)

            def accumulate(_m, args, _o, key=(index, name)):
                sums[key] += (args[0].reshape(-1, args[0].shape[-1]).double() ** 2).sum(0)

            hooks.append(linear.register_forward_hook(accumulate))
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return [
        [(linear.weight.detach(), sums[index, name].sqrt()) for name, linear in block_linears(block).items()]
        for index, block in enumerate(blocks)
    ]


def pooled_outlier_ratio(pairs, m: float) -> float:
    """Share of the block's concatenated |W| * ||X|| scores above m times their mean."""
    scores = torch.cat([(w.double().abs() * x.reshape(1, -1)).flatten() for w, x in pairs])
    return float((scores > m * scores.mean()).double().mean())


def test_owl_block_sparsities_average_to_the_target_and_are_applied():
    from pruning_core.pruning import owl_block_sparsities

    model = make_tiny_model("llama")
    windows = calib()
    sparsities = owl_block_sparsities(model, windows, 0.7, 5.0, 0.08, Walk(batch_size=4, progress=False))
    ratios = [pooled_outlier_ratio(pairs, 5.0) for pairs in dense_block_pairs(model, windows)]
    assert ratios[0] != ratios[1]
    assert sparsities == pytest.approx(official_owl(ratios, 0.7, 0.08), abs=1e-6)
    assert abs(sum(sparsities) / len(sparsities) - 0.7) < 1e-9
    _, blocks = find_blocks(model)
    prune_model(
        model,
        get_scorer("wanda"),
        SparsitySpec(0.7),
        windows,
        block_sparsities=sparsities,
        walk=Walk(progress=False),
    )
    for block, target in zip(blocks, sparsities):
        for linear in block_linears(block).values():
            zeros = (linear.weight == 0).sum(1)
            assert torch.all(zeros == round(target * linear.in_features))


def test_owl_m_changes_the_block_sparsities():
    from pruning_core.pruning import owl_block_sparsities

    model = make_tiny_model("llama", layers=4)  # two blocks would always get target ± lambda
    windows = calib()
    pairs = dense_block_pairs(model, windows)
    by_m = {}
    for m in (1.0, 2.0, 5.0):
        by_m[m] = owl_block_sparsities(model, windows, 0.7, m, 0.08, Walk(batch_size=4, progress=False))
        ratios = [pooled_outlier_ratio(block, m) for block in pairs]
        assert by_m[m] == pytest.approx(official_owl(ratios, 0.7, 0.08), abs=1e-6), m
    assert by_m[1.0] != pytest.approx(by_m[2.0], abs=1e-3)
    assert by_m[2.0] != pytest.approx(by_m[5.0], abs=1e-3)
    assert by_m[1.0] != pytest.approx(by_m[5.0], abs=1e-3)


def test_gradient_magnitudes_are_the_root_sum_of_squared_per_window_gradients_even_under_no_grad():
    """G_ij = sqrt(sum over windows of (dLoss/dW_ij)^2), each window's loss alone; the fitness evaluator
    calls this inside torch.no_grad (its sequential rung), which must not change it."""
    from pruning_core.blocks import prunable_linears
    from pruning_core.gradients import compute_gradient_magnitudes

    model = make_tiny_model("llama")
    windows = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj"
    weight = prunable_linears(model)[name].weight
    expected = torch.zeros_like(weight)
    for window in windows:
        ids = window.unsqueeze(0)
        (grad,) = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, weight)
        expected += grad * grad
    with torch.no_grad():
        got = compute_gradient_magnitudes(model, windows, progress=False)
    torch.testing.assert_close(got[name], expected.sqrt(), rtol=1e-5, atol=1e-8)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
