"""Z-Pruner scores and OWL layer sparsities against direct recomputations from their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from pruning_core.errors import UsageError
from pruning_core.owl import OWL_LAMBDA, OWL_M, outlier_ratio, owl_sparsities
from pruning_core.scorers.base import registered
from pruning_core.scorers.zpruner import ZPruner, zpruner_scores


def zscore_loop(values: list[list[float]]) -> list[list[float]]:
    flat = [v for row in values for v in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / (len(flat) - 1))
    return [[(v - mean) / std for v in row] for row in values]


def zpruner_loop(weight: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """The Z-Pruner definition with plain Python loops; a zero row / column normalises to zeros."""
    w = weight.double().tolist()
    rows, cols = len(w), len(w[0])
    row_norm = [math.sqrt(sum(v * v for v in w[i])) for i in range(rows)]
    col_norm = [math.sqrt(sum(w[i][j] ** 2 for i in range(rows))) for j in range(cols)]
    by_row = [[w[i][j] / row_norm[i] if row_norm[i] else 0.0 for j in range(cols)] for i in range(rows)]
    by_col = [[w[i][j] / col_norm[j] if col_norm[j] else 0.0 for j in range(cols)] for i in range(rows)]
    z_row, z_col = zscore_loop(by_row), zscore_loop(by_col)
    mean_abs = sum(abs(v) for row in w for v in row) / (rows * cols)
    rho = sum(abs(v) < 0.1 * mean_abs for row in w for v in row) / (rows * cols)
    alpha = 0.7 * (1 - 0.3 * rho)
    x = x_norm.double().tolist()
    return torch.tensor(
        [
            [
                (alpha * abs(z_row[i][j]) ** 3 + (1 - alpha) * abs(z_col[i][j]) ** 3) * x[j] ** 1.5
                for j in range(cols)
            ]
            for i in range(rows)
        ],
        dtype=torch.float64,
    )


def test_zpruner_scores_match_definition():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 9, generator=gen)
    weight[1] = 0.0  # a dead output row
    weight[:, 4] = 0.0  # and a dead input column
    weight[2, 7] = 1e-4  # some tiny weights so that rho > 0
    weight[5, 0] = -2e-4
    x_norm = torch.rand(9, generator=gen) * 3
    got = ZPruner().score(weight, {"X": x_norm})
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), zpruner_loop(weight, x_norm), rtol=1e-5, atol=1e-6)


def test_zpruner_constant_matrix_has_zero_scores():
    scores = zpruner_scores(torch.full((4, 4), 0.5), torch.ones(4))
    assert torch.equal(scores, torch.zeros(4, 4))


def test_zpruner_registered():
    scorer = registered()["z-pruner"]
    assert scorer.stats == ("X",) and scorer.default_group == "row"


def test_outlier_ratio_pools_the_block():
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(8, 12, generator=gen) ** 3, torch.rand(12, generator=gen) * 4) for _ in range(3)]
    pairs.append((torch.randn(5, 20, generator=gen), torch.rand(20, generator=gen)))
    scores = [
        abs(w[i, j].item()) * x[j].item()
        for w, x in pairs
        for i in range(w.shape[0])
        for j in range(w.shape[1])
    ]
    mean = sum(scores) / len(scores)
    expected = sum(s > OWL_M * mean for s in scores) / len(scores)
    assert expected > 0
    assert outlier_ratio(pairs) == pytest.approx(expected, abs=1e-12)
    # one linear alone, both call forms
    w, x = pairs[0]
    single = [abs(w[i, j].item()) * x[j].item() for i in range(8) for j in range(12)]
    single_mean = sum(single) / len(single)
    expected_single = sum(s > 3 * single_mean for s in single) / len(single)
    assert outlier_ratio(w, x, m=3) == pytest.approx(expected_single, abs=1e-12)
    assert outlier_ratio([(w, x)], m=3) == outlier_ratio(w, x, m=3)


def check_owl(ratios, target, lam):
    sparsities = owl_sparsities(ratios, target, lam)
    assert len(sparsities) == len(ratios)
    assert abs(sum(sparsities) / len(sparsities) - target) < 1e-6
    assert all(target - lam - 1e-12 <= s <= target + lam + 1e-12 for s in sparsities)
    for a in range(len(ratios)):
        for b in range(len(ratios)):
            if ratios[a] > ratios[b]:
                assert sparsities[a] < sparsities[b]
    return sparsities


def test_owl_balanced_ratios_follow_the_released_mapping():
    ratios = [0.010, 0.030, 0.020, 0.050, 0.040]  # symmetric spread: no bound overshoot
    sparsities = check_owl(ratios, 0.7, OWL_LAMBDA)
    low, high = min(ratios), max(ratios)
    keep = [(r - low) / (high - low) * 2 * OWL_LAMBDA for r in ratios]
    keep_mean = sum(keep) / len(keep)
    expected = [1 - (k - keep_mean + (1 - 0.7)) for k in keep]
    assert sparsities == pytest.approx(expected, abs=1e-12)
    assert max(sparsities) == pytest.approx(0.7 + OWL_LAMBDA) and min(sparsities) == pytest.approx(
        0.7 - OWL_LAMBDA
    )


def test_owl_skewed_and_random_ratios_stay_in_bounds():
    check_owl([0.0] * 9 + [0.3], 0.5, 0.1)  # one outlier-heavy block would overshoot to 0.5 - 0.18
    check_owl([0.2] * 9 + [0.0], 0.6, 0.05)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        ratios = (torch.rand(30, generator=gen) ** 3).tolist()
        check_owl(ratios, 0.7, OWL_LAMBDA)


def test_owl_equal_ratios_give_the_target():
    assert owl_sparsities([0.1, 0.1, 0.1], 0.6) == [0.6, 0.6, 0.6]
    assert owl_sparsities([0.3], 0.6) == [0.6]
    assert owl_sparsities([], 0.6) == []


@pytest.mark.parametrize(
    ("target", "lam", "message"),
    [
        (0.7, -0.01, "lambda must be >= 0"),
        (0.0, 0.08, "in \\(0, 1\\)"),
        (1.0, 0.08, "in \\(0, 1\\)"),
        (0.95, 0.08, "below"),
    ],
)
def test_owl_rejects_bad_inputs(target, lam, message):
    with pytest.raises(UsageError, match=message):
        owl_sparsities([0.1, 0.2], target, lam)


def test_outlier_ratio_rejects_bad_m():
    with pytest.raises(UsageError, match="M must be > 0"):
        outlier_ratio(torch.ones(2, 2), torch.ones(2), m=0)
