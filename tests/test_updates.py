"""Weight updates after any scorer's mask, against independent float64 computations: per-row least
squares with torch.linalg.lstsq for ``refit``, the column-by-column OBS loop of test_solvers for ``obs``."""

from __future__ import annotations

import json

import pytest
import torch
from test_solvers import correlated_layer, damped64, lowest, reference_obs

from pruning_core.errors import UsageError
from pruning_core.masks import keep_mask
from pruning_core.scorers import get_scorer
from pruning_core.scorers.base import SparsitySpec
from pruning_core.scorers.sparsegpt import inverse_hessian_factor, obs_fixed_mask
from pruning_core.sequential import prune_weight
from pruning_core.updates import UPDATES, WithUpdate, with_update


def lstsq_refit(weight, hessian, keep):
    """Per row: argmin over w_hat with w_hat_P = 0 of ||(w_hat - w) L||, H_damped = L L^T, by lstsq."""
    chol = torch.linalg.cholesky(damped64(hessian))
    out = torch.zeros(weight.shape, dtype=torch.float64)
    for r, (w, k) in enumerate(zip(weight.double(), keep)):
        target = (w @ chol).unsqueeze(1)  # (cols, 1)
        solution = torch.linalg.lstsq(chol[k].T, target).solution.squeeze(1)
        out[r, k] = solution
    return out


@pytest.mark.parametrize("spec", [SparsitySpec(0.5), SparsitySpec(0.7), SparsitySpec(n=2, m=4)])
def test_wanda_then_refit_equals_least_squares_per_row(spec):
    weight, x, hessian = correlated_layer(9, 24, 120, seed=4)
    stats = {"X": torch.linalg.vector_norm(x, dim=1), "hessian": hessian}
    keep = keep_mask(weight.abs() * stats["X"].unsqueeze(0), spec)

    got = prune_weight(with_update(get_scorer("wanda"), "refit"), weight, stats, spec)

    assert torch.equal(got != 0, keep)  # the scorer's mask, exactly
    torch.testing.assert_close(got.double(), lstsq_refit(weight, hessian, keep), rtol=1e-4, atol=1e-4)


def test_wanda_then_obs_equals_the_column_by_column_obs_loop():
    weight, x, hessian = correlated_layer(7, 20, 90, seed=5)
    stats = {"X": torch.linalg.vector_norm(x, dim=1), "hessian": hessian}
    keep = keep_mask(weight.abs() * stats["X"].unsqueeze(0), SparsitySpec(0.5))

    got = prune_weight(with_update(get_scorer("wanda"), "obs"), weight, stats, SparsitySpec(0.5))
    expected, _ = reference_obs(weight, hessian, lambda j, w, d2: ~keep[:, j : j + w.shape[1]], span=1)

    assert torch.equal(got != 0, keep)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_stacked_obs_equals_one_layer_at_a_time():
    layers = [correlated_layer(5, 16, 60, seed=s) for s in range(3)]
    keeps = [torch.rand(5, 16, generator=torch.Generator().manual_seed(10 + i)) > 0.5 for i in range(3)]
    factors = torch.stack([inverse_hessian_factor(h) for _, _, h in layers])
    weights = torch.stack([w for w, _, _ in layers])

    got = obs_fixed_mask(weights, factors, ~torch.stack(keeps), block_size=6)

    for (w, _, h), keep, layer in zip(layers, keeps, got):
        expected, _ = reference_obs(
            w, h, lambda j, span, d2, keep=keep: ~keep[:, j : j + span.shape[1]], span=1
        )
        torch.testing.assert_close(layer.double(), expected, rtol=1e-4, atol=1e-4)


def test_updates_lower_the_output_error_of_the_same_mask():
    weight, x, hessian = correlated_layer(8, 32, 200, seed=6)
    keep = keep_mask(weight.abs(), SparsitySpec(0.5))
    masked = weight * keep

    def error(new):
        return torch.linalg.matrix_norm((weight - new).double() @ x.double()).item()

    obs = UPDATES["obs"](weight, {"hessian": hessian}, keep)
    refit = UPDATES["refit"](weight, {"hessian": hessian}, keep)
    assert error(refit) <= error(obs) * (1 + 1e-4) < error(masked)


def test_with_update_reads_the_hessian_and_keeps_the_scorer_group():
    wanda = get_scorer("wanda")
    assert with_update(wanda, "none") is wanda
    updated = with_update(wanda, "obs")
    assert isinstance(updated, WithUpdate) and updated.name == "wanda+obs"
    assert updated.stats == ("X", "hessian") and updated.default_group == wanda.default_group
    with pytest.raises(UsageError, match="unknown update 'ols'"):
        with_update(wanda, "ols")


def test_a_plugin_with_an_update_prunes_like_its_formula_then_the_update(tmp_path, monkeypatch):
    from pruning_core import plugins
    from pruning_core.scorers.base import _REGISTRY

    data = {
        "format": plugins.PLUGIN_FORMAT, "version": plugins.PLUGIN_VERSION, "name": "wanda-refit-plugin",
        "formula": "abs(W) * X", "stats": ["X", "hessian"], "group": "row", "update": "refit",
    }  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(data))
    monkeypatch.setattr(plugins, "_extra_dirs", [tmp_path])
    monkeypatch.setattr("pruning_core.scorers.base._REGISTRY", dict(_REGISTRY))
    plugins.load_plugins()
    scorer = get_scorer("wanda-refit-plugin")

    weight, x, hessian = correlated_layer(6, 16, 80, seed=7)
    stats = {"X": torch.linalg.vector_norm(x, dim=1), "hessian": hessian}
    keep = keep_mask(weight.abs() * stats["X"].unsqueeze(0), SparsitySpec(0.5))
    got = prune_weight(scorer, weight, stats, SparsitySpec(0.5))
    torch.testing.assert_close(got.double(), lstsq_refit(weight, hessian, keep), rtol=1e-4, atol=1e-4)

    bad = {**data, "name": "bad-update", "update": "magic"}
    with pytest.raises(UsageError, match="has update 'magic'"):
        plugins.checked_plugin(bad, "bad.json")
    wrong_stats = {**data, "name": "wrong-stats", "stats": ["X"]}
    (tmp_path / "p.json").write_text(json.dumps(wrong_stats))
    with pytest.raises(UsageError, match="lists stats"):
        plugins.load_plugins()


def wanda_span_choice(x_norm, spec):
    """Wanda written out for one span of the reference loop: |w| * ||X_j|| of the span's current
    weights, then each N:M group's N lowest or the span's cumulative per-row quota."""

    def choose(j, w, _d2):
        scores = w.abs() * x_norm[j : j + w.shape[1]].double().unsqueeze(0)
        rows, width = scores.shape
        if spec.is_nm:
            return lowest(scores.reshape(rows, width // spec.m, spec.m), spec.n).reshape(rows, width)
        count = round(spec.sparsity * (j + width)) - round(spec.sparsity * j)
        return lowest(scores, count)

    return choose


@pytest.mark.parametrize("spec", [SparsitySpec(n=2, m=4), SparsitySpec(0.5)])
def test_adaptive_wanda_equals_the_obs_loop_choosing_on_updated_weights(spec, monkeypatch):
    import pruning_core.updates as updates

    monkeypatch.setattr(updates, "ADAPTIVE_SPAN", 8)  # three spans over 24 columns
    weight, x, hessian = correlated_layer(9, 24, 120, seed=7)
    x_norm = torch.linalg.vector_norm(x, dim=1)
    stats = {"X": x_norm, "hessian": hessian}

    got = prune_weight(with_update(get_scorer("wanda"), "adaptive"), weight, stats, spec)
    span = spec.m if spec.is_nm else 8
    expected, pruned = reference_obs(weight, hessian, wanda_span_choice(x_norm, spec), span=span)

    assert torch.equal(got == 0, pruned)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    # the masks really are chosen on the updated weights: Wanda's mask of the dense weight differs
    assert not torch.equal(got != 0, keep_mask(weight.abs() * x_norm.unsqueeze(0), spec))


def test_adaptive_formula_reads_h_as_the_inverse_hessian_diagonal_of_its_columns():
    from primitives.scorer import FormulaScorer
    from pruning_core.linalg import inverse_hessian_diag

    weight, x, hessian = correlated_layer(6, 16, 80, seed=8)
    spec = SparsitySpec(n=2, m=4)
    hinv = inverse_hessian_diag(hessian)

    got = prune_weight(with_update(FormulaScorer("W^2 / H"), "adaptive"), weight, {"hessian": hessian}, spec)

    def choose(j, w, _d2):
        scores = w**2 / hinv[j : j + w.shape[1]].double().unsqueeze(0)
        return lowest(scores.reshape(w.shape[0], -1, 4), 2).reshape(w.shape)

    expected, pruned = reference_obs(weight, hessian, choose, span=4)
    assert torch.equal(got == 0, pruned)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_adaptive_is_refused_for_solvers_in_one_line():
    with pytest.raises(UsageError, match="not adaptive"):
        with_update(get_scorer("sparsegpt"), "adaptive")
