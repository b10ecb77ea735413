"""SparseGPT and APT against independent float64 references written here: a column-by-column OBS loop
with explicit inverse-Hessian elimination, per-row least squares, and Wanda computed directly."""

from __future__ import annotations

import itertools

import pytest
import torch

from pruning_core.errors import UsageError
from pruning_core.scorers.apt import APT, apt_prune, apt_select, exact_obs_update, joint_refit
from pruning_core.scorers.base import SparsitySpec, registered
from pruning_core.scorers.sparsegpt import SparseGPT, live_weight, obs_prune_with_mask, sparsegpt_prune


def correlated_layer(rows: int, cols: int, tokens: int, seed: int):
    """W, calibration inputs X (cols x tokens) = (Z A)^T with a random mixing A, and H = 2/n X X^T."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen) / cols**0.5 + 0.3 * torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=gen) @ mixing).T.contiguous()
    weight = torch.randn(rows, cols, generator=gen)
    return weight, x, 2.0 / tokens * x @ x.T


def damped64(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def reference_obs(weight, hessian, choose, span):
    """Column-by-column OBS in float64 with the inverse Hessian of the not-yet-fixed columns kept
    explicitly. ``choose(j, w, d2)`` returns the pruned mask of columns j..j+span-1, where d2[j] is
    [H^-1]_jj once the columns before j are fixed, i.e. inv(H[j:, j:])[0, 0]."""
    h = damped64(hessian)
    cols = h.shape[0]
    w = weight.double().clone()
    w[:, torch.diagonal(hessian) == 0] = 0.0
    d2 = torch.tensor([torch.linalg.inv(h[j:, j:])[0, 0].item() for j in range(cols)], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    pruned = torch.zeros(w.shape, dtype=torch.bool)
    for j in range(cols):
        if j % span == 0:
            stop = min(j + span, cols)
            pruned[:, j:stop] = choose(j, w[:, j:stop], d2[j:stop])
        step = torch.where(pruned[:, j], w[:, j], torch.zeros_like(w[:, j])) / hinv[j, j]
        w -= step.unsqueeze(1) * hinv[j].unsqueeze(0)
        w[pruned[:, j], j] = 0.0
        # column j is fixed from now on: eliminate it from the inverse of the remaining columns
        hinv = hinv - torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]
    return w, pruned


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    pruned = torch.zeros(scores.shape, dtype=torch.bool)
    order = torch.argsort(scores, dim=-1, stable=True)
    pruned.scatter_(-1, order[..., :count], True)
    return pruned


def output_error(weight, new_weight, x) -> float:
    return torch.linalg.matrix_norm((weight.double() - new_weight.double()) @ x.double()).item()


def wanda_pruned(weight, x, spec: SparsitySpec) -> torch.Tensor:
    """Wanda written out: |W_ij| * ||X_j||, lowest per row (or per group of M), no update."""
    scores = weight.abs() * torch.linalg.vector_norm(x, dim=1).unsqueeze(0)
    rows, cols = weight.shape
    if spec.is_nm:
        pruned = lowest(scores.reshape(rows, cols // spec.m, spec.m), spec.n).reshape(rows, cols)
    else:
        pruned = lowest(scores, round(spec.sparsity * cols))
    return weight.masked_fill(pruned, 0.0)


def test_fixed_mask_update_matches_column_by_column_obs():
    weight, _, hessian = correlated_layer(6, 21, 80, seed=1)
    keep = torch.rand(6, 21, generator=torch.Generator().manual_seed(2)) > 0.4

    expected, _ = reference_obs(weight, hessian, lambda j, w, d2: ~keep[:, j : j + w.shape[1]], span=1)
    got = obs_prune_with_mask(weight, hessian, keep, block_size=8)  # three blocks, the last partial

    assert torch.equal(got[~keep], torch.zeros(int((~keep).sum())))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [SparsitySpec(0.6), SparsitySpec(0.6, group="matrix"), SparsitySpec(n=2, m=4)],
    ids=["row-0.6", "matrix-0.6", "2:4"],
)
def test_sparsegpt_matches_reference_selection_and_update(spec):
    weight, _, hessian = correlated_layer(7, 24, 100, seed=3)
    block = 8

    def choose(j, w, d2):
        scores = w**2 / d2.unsqueeze(0)
        if spec.is_nm:
            return lowest(scores.reshape(w.shape[0], -1, spec.m), spec.n).reshape(w.shape)
        if spec.group == "matrix":  # the block's lowest over all its rows, quotas rounded cumulatively
            rows = w.shape[0]
            quota = round(spec.sparsity * rows * (j + w.shape[1])) - round(spec.sparsity * rows * j)
            return lowest(scores.reshape(1, -1), quota).reshape(w.shape)
        # per-row quota of this block: cumulative rounding, so each row totals round(s * cols)
        quota = round(spec.sparsity * (j + w.shape[1])) - round(spec.sparsity * j)
        return lowest(scores, quota)

    expected_w, expected_pruned = reference_obs(weight, hessian, choose, span=spec.m or block)
    got_w, got_pruned = sparsegpt_prune(weight, hessian, spec, block_size=block)

    assert torch.equal(got_pruned, expected_pruned)
    torch.testing.assert_close(got_w.double(), expected_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [SparsitySpec(0.5), SparsitySpec(0.7), SparsitySpec(n=2, m=4), SparsitySpec(n=4, m=8)],
    ids=["row-0.5", "row-0.7", "2:4", "4:8"],
)
@pytest.mark.parametrize("solver", [SparseGPT(), APT()], ids=["sparsegpt", "apt"])
def test_exact_zero_counts(solver, spec):
    weight, _, hessian = correlated_layer(10, 200, 300, seed=4)  # 200 columns: a partial last block
    new = solver.prune(weight, {"hessian": hessian}, spec)
    assert new.dtype == torch.float32 and new.shape == weight.shape
    zeros = new == 0
    if spec.is_nm:
        per_group = zeros.reshape(10, -1, spec.m).sum(dim=2)
        assert torch.equal(per_group, torch.full_like(per_group, spec.n))
    else:
        per_row = zeros.sum(dim=1)
        assert torch.equal(per_row, torch.full_like(per_row, round(spec.sparsity * 200)))


def test_matrix_group_total_count():
    weight, _, hessian = correlated_layer(9, 150, 200, seed=5)
    new, pruned = sparsegpt_prune(weight, hessian, SparsitySpec(0.55, group="matrix"))
    assert int((new == 0).sum()) == int(pruned.sum()) == round(0.55 * 9 * 150)
    # the block-wide rule lets rows differ
    assert pruned.sum(dim=1).unique().numel() > 1


def lstsq_rows(weight, hessian, pruned):
    """Per row: minimise ||(w - w_hat) L||^2 over the kept weights with w_hat_P = 0, where
    L L^T is the damped Hessian (float64 least squares on the Cholesky factor)."""
    factor = torch.linalg.cholesky(damped64(hessian))
    out = torch.zeros(weight.shape, dtype=torch.float64)
    for r in range(weight.shape[0]):
        kept = (~pruned[r]).nonzero().squeeze(1)
        target = weight[r].double() @ factor
        solution = torch.linalg.lstsq(factor[kept].T, target.unsqueeze(1)).solution.squeeze(1)
        out[r, kept] = solution
    return out


def test_exact_update_matches_lstsq_for_mixed_row_counts():
    weight, _, hessian = correlated_layer(12, 40, 160, seed=6)
    gen = torch.Generator().manual_seed(7)
    # groups of rows pruning 5, 15, 25, 35 of 40 weights: both the pruned-set and the kept-set systems
    pruned = torch.stack([torch.randperm(40, generator=gen) < 5 + 10 * (r % 4) for r in range(12)])
    got = exact_obs_update(weight, hessian, pruned, chunk_elements=300)  # chunks of one or two rows
    torch.testing.assert_close(got.double(), lstsq_rows(weight, hessian, pruned), rtol=1e-4, atol=1e-4)


def reference_apt(weight, hessian, spec: SparsitySpec, span: int):
    """APT's pass written out in float64: for each span of columns, left to right, the inverse of the
    damped Hessian of the columns not yet fixed (inverted directly); then row by row, N:M tries every
    pruned set of each group and keeps the lowest w_P [Hinv_PP]^-1 w_P^T; unstructured removes the
    row's count one weight at a time, each the lowest w_q^2 / [Hinv]_qq of the span, with the OBS update
    and the inverse's elimination after each. Counts: the row quota, or ("matrix") how many of the
    lowest w_q^2 / [Hinv]_qq over the span's rows fall in the row."""
    h = damped64(hessian)
    rows, cols = weight.shape
    w = weight.double().clone()
    w[:, torch.diagonal(hessian) == 0] = 0.0
    pruned = torch.zeros(w.shape, dtype=torch.bool)
    span = spec.m if spec.is_nm else span
    sets = [list(c) for c in itertools.combinations(range(spec.m or 1), (spec.m or 1) - (spec.n or 0))]
    for s in range(0, cols, span):
        e = min(s + span, cols)
        start_hinv = torch.linalg.inv(h[s:, s:])  # the free columns s.. (those before s are fixed)
        if not spec.is_nm:
            losses = w[:, s:e] ** 2 / torch.diagonal(start_hinv)[: e - s]
            if spec.group == "matrix":
                total = round(spec.sparsity * rows * e) - round(spec.sparsity * rows * s)
                counts = lowest(losses.reshape(1, -1), total).reshape(rows, e - s).sum(dim=1)
            else:
                counts = torch.full((rows,), round(spec.sparsity * e) - round(spec.sparsity * s))
        for r in range(rows):
            hinv, row = start_hinv.clone(), w[r, s:]
            if spec.is_nm:
                losses = [row[p] @ torch.linalg.inv(hinv[p][:, p]) @ row[p] for p in sets]
                chosen = sets[min(range(len(sets)), key=lambda i: losses[i].item())]
                row -= row[chosen] @ torch.linalg.inv(hinv[chosen][:, chosen]) @ hinv[chosen]
                pruned[r, [s + q for q in chosen]] = True
            else:
                for _ in range(int(counts[r])):
                    free = [q for q in range(e - s) if not pruned[r, s + q]]
                    q = min(free, key=lambda q: (row[q] ** 2 / hinv[q, q]).item())
                    row -= row[q] / hinv[q, q] * hinv[q]
                    hinv = hinv - torch.outer(hinv[:, q], hinv[q]) / hinv[q, q]
                    pruned[r, s + q] = True
            row[pruned[r, s:]] = 0.0
    return w, pruned


@pytest.mark.parametrize(
    "spec",
    [SparsitySpec(n=2, m=4), SparsitySpec(n=4, m=8), SparsitySpec(n=1, m=4), SparsitySpec(0.5),
     SparsitySpec(0.7), SparsitySpec(0.55, group="matrix")],
    ids=["2:4", "4:8", "1:4", "row-0.5", "row-0.7", "matrix-0.55"],
)  # fmt: skip
def test_apt_equals_brute_force_joint_pruning(spec):
    weight, _, hessian = correlated_layer(6, 48, 120, seed=8)
    # 48 columns in blocks of 16: the lazy block update runs; unstructured spans of 8 (quotas 4/4/...)
    got_w, got_pruned = apt_select(weight, hessian, spec, block_size=16, span=8)
    expected_w, expected_pruned = reference_apt(weight, hessian, spec, span=8)
    assert torch.equal(got_pruned, expected_pruned)
    assert torch.equal(got_w[got_pruned], torch.zeros(int(got_pruned.sum())))
    torch.testing.assert_close(got_w.double(), expected_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [SparsitySpec(0.5), SparsitySpec(n=2, m=4)], ids=["0.5", "2:4"])
def test_apt_gives_its_pruned_sets_the_rows_least_squares_optimum(spec):
    weight, x, hessian = correlated_layer(16, 64, 256, seed=8)
    new, pruned = apt_prune(weight, hessian, spec, block_size=32)
    selected, selected_pruned = apt_select(weight, hessian, spec, block_size=32)
    assert torch.equal(pruned, selected_pruned) and torch.equal(new[pruned], torch.zeros(int(pruned.sum())))
    optimum = lstsq_rows(weight, hessian, pruned)
    # run to convergence (until a step lowers the error by nothing), the conjugate gradients give the
    # least-squares weights ...
    converged = joint_refit(
        live_weight(weight, hessian), selected, pruned, damped64(hessian).float(), 0.0, 500
    )
    torch.testing.assert_close(converged.double(), optimum, rtol=1e-4, atol=1e-4)
    # ... and at the default tolerance, the optimum's output error to 0.1%
    assert output_error(weight, new, x) <= 1.001 * output_error(weight, optimum, x)
    assert output_error(weight, new, x) < 0.95 * output_error(weight, selected, x)


def test_the_refit_stops_at_the_first_step_that_lowers_the_error_by_at_most_the_tolerance():
    weight, _, hessian = correlated_layer(16, 64, 256, seed=5)
    selected, pruned = apt_select(weight, hessian, SparsitySpec(0.5), block_size=32)
    original, h = live_weight(weight, hessian), damped64(hessian).float()

    def error(w):  # the layer's error, computed directly in float64
        difference = (w - original).double()
        return float(((difference @ h.double()) * difference).sum())

    errors = [error(joint_refit(original, selected, pruned, h, 0.0, steps)) for steps in range(40)]
    for tolerance in (1e-2, 1e-3, 1e-4):
        first = next(k for k in range(1, 40) if errors[k - 1] - errors[k] <= tolerance * errors[k])
        assert 1 < first < 40
        got = joint_refit(original, selected, pruned, h, tolerance, 40)
        torch.testing.assert_close(
            got, joint_refit(original, selected, pruned, h, 0.0, first), rtol=0, atol=0
        )


def test_apt_matrix_group_takes_each_rows_count_from_the_spans_lowest_losses():
    weight, _, hessian = correlated_layer(9, 64, 200, seed=9)
    spec = SparsitySpec(0.55, group="matrix")
    _, pruned = apt_prune(weight, hessian, spec, block_size=32, span=16)
    assert int(pruned.sum()) == round(0.55 * 9 * 64)
    for first in range(0, 64, 16):  # every span holds its cumulative share of the total
        span_total = int(pruned[:, first : first + 16].sum())
        assert span_total == round(0.55 * 9 * (first + 16)) - round(0.55 * 9 * first)
    assert pruned.sum(dim=1).unique().numel() > 1  # rows differ, as under SparseGPT's rule


@pytest.mark.parametrize("spec", [SparsitySpec(0.5), SparsitySpec(n=2, m=4)], ids=["0.5", "2:4"])
@pytest.mark.parametrize("seed", [10, 11, 12])
def test_output_error_apt_le_sparsegpt_le_wanda(spec, seed):
    weight, x, hessian = correlated_layer(32, 160, 640, seed=seed)
    stats = {"hessian": hessian}
    apt_error = output_error(weight, APT().prune(weight, stats, spec), x)
    sparsegpt_error = output_error(weight, SparseGPT().prune(weight, stats, spec), x)
    wanda_error = output_error(weight, wanda_pruned(weight, x, spec), x)
    assert apt_error <= sparsegpt_error <= wanda_error


def test_dead_inputs_are_zeroed_and_pruned_first():
    weight, x, _ = correlated_layer(5, 32, 120, seed=13)
    x[[3, 17]] = 0.0  # two inputs never active in calibration
    hessian = 2.0 / x.shape[1] * x @ x.T
    for prune in (SparseGPT().prune, APT().prune):
        new = prune(weight, {"hessian": hessian}, SparsitySpec(0.5))
        assert torch.isfinite(new).all()
        assert torch.equal(new[:, [3, 17]], torch.zeros(5, 2))
        assert torch.equal((new == 0).sum(dim=1), torch.full((5,), 16))


def test_nm_needs_divisible_columns():
    weight, _, hessian = correlated_layer(4, 30, 60, seed=14)
    with pytest.raises(UsageError, match="divisible by 4"):
        SparseGPT().prune(weight, {"hessian": hessian}, SparsitySpec(n=2, m=4))


def test_registered_under_their_names():
    solvers = registered()
    assert isinstance(solvers["sparsegpt"], SparseGPT) and solvers["sparsegpt"].stats == ("hessian",)
    assert isinstance(solvers["apt"], APT) and solvers["apt"].default_group == "matrix"
