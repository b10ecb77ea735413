"""The published metrics written as formulas give exactly the masks of the built-in scorers and of
their definitions written out here."""

from __future__ import annotations

import pytest
import torch

from primitives import KNOWN_FORMULAS, compile_formula
from primitives.scorer import FormulaScorer
from pruning_core.masks import keep_mask
from pruning_core.scorers import registered
from pruning_core.scorers.base import SparsitySpec

SPECS = [
    SparsitySpec(0.5),
    SparsitySpec(0.7),
    SparsitySpec(0.5, 2, 4),
    SparsitySpec(0.5, 4, 8),
    SparsitySpec(0.5, group="matrix"),
    SparsitySpec(0.6, group="matrix"),
]
SEEDS = [0, 1, 2]


def make_layer(seed, rows=24, cols=64):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    weight[:, :3] *= 20  # a few outlier input channels, as in LLM layers
    inputs = torch.randn(cols, 4 * cols, generator=gen) * (torch.rand(cols, 1, generator=gen) * 3 + 0.1)
    stats = {
        "X": inputs.norm(dim=1),
        "hessian": 2.0 / inputs.shape[1] * inputs @ inputs.T,
        "G": torch.rand(rows, cols, generator=gen) * 1e-3,
    }
    return weight, stats


def _mms(x):
    return (x - x.min()) / (x.max() - x.min())


def _zscore_sample(x):
    return (x - x.mean()) / ((x - x.mean()).pow(2).sum() / (x.numel() - 1)).sqrt()


def _zpruner(w, x):
    """Z-Pruner's metric from its definition (float64)."""
    w = w.double()
    z_row = _zscore_sample(w / w.pow(2).sum(dim=1, keepdim=True).sqrt())
    z_col = _zscore_sample(w / w.pow(2).sum(dim=0, keepdim=True).sqrt())
    rho = (w.abs() < 0.1 * w.abs().mean()).double().mean()
    alpha = 0.7 * (1 - 0.3 * rho)
    return (alpha * z_row.abs() ** 3 + (1 - alpha) * z_col.abs() ** 3) * x.double()[None, :] ** 1.5


def _inverse_hessian_diag(hessian):
    damped = hessian.double() + 0.01 * torch.diagonal(hessian).double().mean() * torch.eye(hessian.shape[0])
    return torch.diagonal(torch.linalg.inv(damped))


DEFINITIONS = {
    "magnitude": lambda w, s: w.abs(),
    "wanda": lambda w, s: w.abs() * s["X"][None, :],
    "pruner-zero": lambda w, s: w * w * _mms(s["G"]),
    "ria": lambda w, s: (
        (w.abs() / w.abs().sum(1, keepdim=True) + w.abs() / w.abs().sum(0, keepdim=True))
        * s["X"][None, :].sqrt()
    ),
    "sparsegpt-mask": lambda w, s: w.double() ** 2 / _inverse_hessian_diag(s["hessian"])[None, :] ** 2,
    "z-pruner": lambda w, s: _zpruner(w, s["X"]),
}


def _assert_same_masks(scores, other, context):
    for spec in SPECS:
        assert torch.equal(keep_mask(scores, spec), keep_mask(other, spec)), (context, spec)


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
@pytest.mark.parametrize("seed", SEEDS)
def test_formula_masks_equal_the_written_out_definition(name, seed):
    weight, stats = make_layer(seed)
    scores = FormulaScorer(KNOWN_FORMULAS[name]).score(weight, stats)
    _assert_same_masks(scores, DEFINITIONS[name](weight, stats), name)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "ria", "pruner-zero", "z-pruner"])
@pytest.mark.parametrize("seed", SEEDS)
def test_formula_masks_equal_the_builtin_scorer(name, seed):
    weight, stats = make_layer(seed)
    builtin = registered()[name].score(weight, stats)
    _assert_same_masks(FormulaScorer(KNOWN_FORMULAS[name]).score(weight, stats), builtin, name)
    # The row-group canonical form (what the GP evaluates) gives the row-group masks too.
    row_scores = compile_formula(KNOWN_FORMULAS[name], "row")(weight, stats)
    for spec in SPECS:
        if spec.group == "row":
            assert torch.equal(keep_mask(row_scores, spec), keep_mask(builtin, spec)), (name, spec)


def test_formula_scorer_declares_the_statistics_the_core_collects():
    expected = {
        "magnitude": (),
        "wanda": ("X",),
        "pruner-zero": ("G",),
        "ria": ("X",),
        "sparsegpt-mask": ("hessian",),
        "z-pruner": ("X",),
    }
    assert {name: FormulaScorer(text).stats for name, text in KNOWN_FORMULAS.items()} == expected
    for name in ("magnitude", "wanda", "ria", "pruner-zero", "z-pruner"):
        assert FormulaScorer(KNOWN_FORMULAS[name]).stats == tuple(registered()[name].stats)
