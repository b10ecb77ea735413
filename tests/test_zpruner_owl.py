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
    assert scorer.stats == ("X",) and scorer.default_group == "matrix"


def pooled_ratio_loop(pairs, m: float) -> float:
    """Share of |W_ij| * ||X_j|| above m times the mean, over every score of the block, by plain loops."""
    scores = [
        abs(w[i, j].item()) * x[j].item()
        for w, x in pairs
        for i in range(w.shape[0])
        for j in range(w.shape[1])
    ]
    mean = sum(scores) / len(scores)
    return sum(s > m * mean for s in scores) / len(scores)


def test_outlier_ratio_pools_the_block():
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(8, 12, generator=gen) ** 3, torch.rand(12, generator=gen) * 4) for _ in range(3)]
    pairs.append((torch.randn(5, 20, generator=gen), torch.rand(20, generator=gen)))
    expected = pooled_ratio_loop(pairs, OWL_M)
    assert expected > 0
    assert outlier_ratio(pairs) == pytest.approx(expected, abs=1e-12)
    # one linear alone, both call forms
    w, x = pairs[0]
    expected_single = pooled_ratio_loop([(w, x)], 3)
    assert outlier_ratio(w, x, m=3) == pytest.approx(expected_single, abs=1e-12)
    assert outlier_ratio([(w, x)], m=3) == outlier_ratio(w, x, m=3)


def test_outlier_ratio_follows_m_on_a_block():
    gen = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(6, 10, generator=gen) ** 3, torch.rand(10, generator=gen) * 4) for _ in range(2)]
    pairs.append((torch.randn(10, 7, generator=gen), torch.rand(7, generator=gen)))
    expected = {m: pooled_ratio_loop(pairs, m) for m in (1.0, 2.0, 5.0)}
    assert len(set(expected.values())) == 3  # the three multiples must tell apart
    for m, ratio in expected.items():
        assert outlier_ratio(pairs, m=m) == pytest.approx(ratio, abs=1e-12)


def test_outlier_ratio_takes_m_by_keyword_only():
    w, x = torch.ones(2, 2), torch.ones(2)
    with pytest.raises(TypeError):
        outlier_ratio(w, x, 2.0)
    with pytest.raises(ValueError, match="inside the"):
        outlier_ratio([(w, x)], x)


def official_owl(ratios, target, lam):
    """luuyin/OWL's mapping: min-max onto [0, 2*lam], shift to mean 1 - target, sparsity = 1 - value."""
    low, high = min(ratios), max(ratios)
    kept = [(r - low) * (1 / (high - low) * lam * 2) for r in ratios]
    kept_mean = sum(kept) / len(kept)
    kept = [k - kept_mean + (1 - target) for k in kept]
    return [1 - k for k in kept]


def test_owl_skewed_ratios_follow_the_released_mapping():
    sparsities = owl_sparsities([10, 1, 1, 1, 1], 0.5, 0.08)
    # by hand: kept = [0.16, 0, 0, 0, 0], mean 0.032, so 0.5 - 0.128 and 0.5 + 0.032
    assert sparsities == pytest.approx([0.372, 0.532, 0.532, 0.532, 0.532], abs=1e-12)
    assert sparsities == pytest.approx(official_owl([10, 1, 1, 1, 1], 0.5, 0.08), abs=1e-12)
    assert sum(sparsities) / 5 == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(
    ("ratios", "target", "lam"),
    [
        ([0.010, 0.030, 0.020, 0.050, 0.040], 0.7, OWL_LAMBDA),
        ([0.0] * 9 + [0.3], 0.5, 0.1),  # one outlier-heavy block lands 0.18 below the target
        ([0.2] * 9 + [0.0], 0.6, 0.05),
    ],
)
def test_owl_follows_the_released_mapping(ratios, target, lam):
    sparsities = owl_sparsities(ratios, target, lam)
    assert sparsities == pytest.approx(official_owl(ratios, target, lam), abs=1e-12)
    assert sum(sparsities) / len(sparsities) == pytest.approx(target, abs=1e-12)
    assert max(sparsities) - min(sparsities) == pytest.approx(2 * lam, abs=1e-12)


def test_owl_random_ratios_follow_the_released_mapping():
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        ratios = (torch.rand(30, generator=gen) ** 3).tolist()
        sparsities = owl_sparsities(ratios, 0.7, OWL_LAMBDA)
        assert sparsities == pytest.approx(official_owl(ratios, 0.7, OWL_LAMBDA), abs=1e-12)
        assert sum(sparsities) / len(sparsities) == pytest.approx(0.7, abs=1e-12)
        most, least = ratios.index(max(ratios)), ratios.index(min(ratios))
        assert sparsities[most] == min(sparsities) and sparsities[least] == max(sparsities)


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
        (0.95, 0.08, "outside \\[0, 1\\); use --owl-lambda below 0.05$"),  # [0.1, 0.2] -> [1.03, 0.87]
        (0.05, 0.08, "outside \\[0, 1\\); use --owl-lambda below 0.05$"),  # -> [0.13, -0.03]
    ],
)
def test_owl_rejects_bad_inputs(target, lam, message):
    with pytest.raises(UsageError, match=message):
        owl_sparsities([0.1, 0.2], target, lam)


def test_owl_range_is_checked_on_the_mapped_sparsities():
    # within target ± lambda would fit, but the skewed block lands at 0.1 - 0.128 < 0
    with pytest.raises(UsageError, match="use --owl-lambda below 0.0625"):
        owl_sparsities([10, 1, 1, 1, 1], 0.1, 0.08)
    assert min(owl_sparsities([10, 1, 1, 1, 1], 0.1, 0.062)) == pytest.approx(0.1 - 0.062 * 1.6, abs=1e-12)


def test_outlier_ratio_rejects_bad_m():
    with pytest.raises(UsageError, match="M must be > 0"):
        outlier_ratio(torch.ones(2, 2), torch.ones(2), m=0)
