"""FormulaScorer as the pruning core sees it: the Scorer protocol, the entry point, the CLI flag."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from primitives import canonical_key
from primitives.scorer import FormulaScorer
from pruning_core.errors import UsageError
from pruning_core.formula import formula_scorer
from pruning_core.masks import keep_mask
from pruning_core.scorers.base import Scorer, SparsitySpec


@pytest.mark.parametrize(
    "text, stats",
    [
        ("abs(W)", ()),
        ("abs(W) * X", ("X",)),
        ("W * G", ("G",)),
        ("abs(W) / H", ("hessian",)),
        ("U * X", ("X", "hessian")),
        ("W * X / X", ()),  # the canonical form needs no X
    ],
)
def test_stats_are_the_core_statistics_the_canonical_form_reads(text, stats):
    assert FormulaScorer(text).stats == stats


def test_attributes_and_protocol():
    scorer = FormulaScorer("sqr(W) * X", group="matrix")
    assert isinstance(scorer, Scorer)
    assert scorer.text == "sqr(W) * X"
    assert scorer.name == canonical_key("sqr(W) * X", "matrix") == "sqrt(X) * abs(W)"
    assert scorer.default_group == "matrix"
    assert FormulaScorer("W").default_group == "row"
    assert "wanda" in FormulaScorer("sqr(W) * sqr(X)").reference


def test_scores_are_float32_with_the_weight_shape_and_order_like_the_formula():
    weight = torch.randn(8, 16, dtype=torch.float16)
    x = torch.rand(16) + 0.5
    scores = FormulaScorer("sqr(W) * X").score(weight, {"X": x})
    assert scores.dtype == torch.float32 and scores.shape == weight.shape
    want = weight.float() ** 2 * x[None, :]
    for spec in (SparsitySpec(0.5), SparsitySpec(0.5, 2, 4), SparsitySpec(0.5, group="matrix")):
        assert torch.equal(keep_mask(scores, spec), keep_mask(want, spec))


def test_entry_point_gives_the_formula_scorer():
    scorer = formula_scorer("abs(W) * X", group="row")
    assert isinstance(scorer, FormulaScorer) and scorer.name == "X * abs(W)"
    with pytest.raises(UsageError):
        formula_scorer("W.__class__")
    with pytest.raises(UsageError, match="group"):
        FormulaScorer("W", group="column")


def test_cli_rejects_hostile_formula_with_exit_2_and_runs_nothing(tmp_path):
    text = "__import__('os').system('touch x')"
    proc = subprocess.run(
        [sys.executable, "-m", "pruning_core", "prune", "--formula", text],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "dunder" in lines[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
