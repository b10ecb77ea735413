"""Weight updates after any scorer's mask, against independent float64 computations: per-row least
squares with torch.linalg.lstsq for ``refit``, the column-by-column OBS loop of test_solvers for ``obs``."""

from __future__ import annotations

import json

import pytest
import torch
from test_solvers import correlated_layer, damped64, reference_obs

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
        plugins.validate_plugin(bad, "bad.json")
    wrong_stats = {**data, "name": "wrong-stats", "stats": ["X"]}
    (tmp_path / "p.json").write_text(json.dumps(wrong_stats))
    with pytest.raises(UsageError, match="lists stats"):
        plugins.load_plugins()
