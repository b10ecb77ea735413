"""Masks against direct counts and a reference sort."""

from __future__ import annotations

import pytest
import torch
from mask_reference import stable_keep

from pruning_core.errors import UsageError
from pruning_core.masks import keep_mask, parse_pattern
from pruning_core.scorers.base import SparsitySpec


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.63, 0.9])
def test_row_group_prunes_the_same_count_in_every_row(sparsity):
    scores = torch.randn(37, 101)
    scores[3] = 1.0  # a row of ties still gets exactly the count
    keep = keep_mask(scores, SparsitySpec(sparsity, group="row"))
    zeros = (~keep).sum(dim=1)
    assert torch.all(zeros == round(sparsity * 101))
    # the pruned entries of each row are its lowest scores (reference: per-row threshold)
    for row in range(37):
        if row == 3:
            continue
        k = round(sparsity * 101)
        threshold = scores[row].sort().values[k - 1]
        assert torch.equal(~keep[row], scores[row] <= threshold)


def test_matrix_group_uses_one_threshold():
    scores = torch.randn(20, 30)
    keep = keep_mask(scores, SparsitySpec(0.4, group="matrix"))
    k = round(0.4 * 600)
    threshold = scores.flatten().sort().values[k - 1]
    assert (~keep).sum() == k
    assert torch.equal(~keep, scores <= threshold)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_groups_have_exactly_n_zeros(n, m):
    scores = torch.randn(16, 64)
    keep = keep_mask(scores, SparsitySpec(n / m, n, m))
    groups = keep.reshape(16, 64 // m, m)
    assert torch.all((~groups).sum(-1) == n)
    # zeros sit on the n smallest of every group
    values = scores.reshape(16, 64 // m, m)
    kth = values.sort(dim=-1).values[..., n - 1 : n]
    assert torch.equal(~groups, values <= kth)


def test_ties_are_broken_by_index():
    keep = keep_mask(torch.ones(2, 8), SparsitySpec(0.5, group="row"))
    assert torch.equal(keep, torch.tensor([[False] * 4 + [True] * 4] * 2))


@pytest.mark.parametrize("text", ["3:2", "0:4", "a:b", "2-4", "4:4"])
def test_bad_patterns(text):
    with pytest.raises(UsageError):
        parse_pattern(text, 0.5)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.2, 1.5])
def test_bad_sparsity(value):
    with pytest.raises(UsageError):
        parse_pattern(None, value)


@pytest.mark.parametrize("levels", [3, 16, 1000])
def test_masks_equal_a_stable_argsort_reference_with_many_ties(levels):
    generator = torch.Generator().manual_seed(levels)
    scores = torch.randint(0, levels, (24, 96), generator=generator).float()
    for sparsity in (0.25, 0.5, 0.7):
        k = round(sparsity * 96)
        reference = torch.ones_like(scores, dtype=torch.bool)
        for row in range(24):
            order = sorted(range(96), key=lambda j, row=row: (scores[row, j].item(), j))
            reference[row, order[:k]] = False
        assert torch.equal(keep_mask(scores, SparsitySpec(sparsity, group="row")), reference)


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (8, 16)])
@pytest.mark.parametrize("levels", [3, 1000])
def test_nm_masks_equal_a_stable_argsort_reference(n, m, levels):
    """Short groups take the sorting-network threshold, longer ones kthvalue: both must prune the n
    lowest of every group with ties broken by index, as a stable sort of each group would."""
    generator = torch.Generator().manual_seed(levels * m + n)
    scores = torch.randint(0, levels, (12, 4 * m), generator=generator).float()
    order = torch.argsort(scores.reshape(12, 4, m), dim=-1, stable=True)
    reference = torch.ones(12, 4, m, dtype=torch.bool).scatter_(-1, order[..., :n], False).reshape(12, 4 * m)
    assert torch.equal(keep_mask(scores, SparsitySpec(n / m, n, m)), reference)


@pytest.mark.parametrize("setting", ["0.5-row", "0.5-matrix", "0.3-row", "2:4", "4:8"])
@pytest.mark.parametrize("levels", [5, 100000])
def test_a_stack_of_matrices_is_masked_as_each_matrix_alone(setting, levels, monkeypatch):
    """Stacked (S, out, in) scores give every matrix the mask of a stable sort of that matrix alone,
    also when the CPU selection splits the slices into many chunks run by several threads."""
    monkeypatch.setattr("pruning_core.masks.SELECT_CHUNK", 64)  # many chunks of a few rows
    generator = torch.Generator().manual_seed(levels)
    scores = torch.randint(0, levels, (5, 16, 48), generator=generator).float()
    scores[2] = 7.0  # one matrix of ties only
    if ":" in setting:
        n, m = map(int, setting.split(":"))
        spec = SparsitySpec(n / m, n, m)
    else:
        sparsity, group = setting.split("-")
        spec = SparsitySpec(float(sparsity), group=group)
    stacked = keep_mask(scores, spec)
    for matrix, keep in zip(scores, stacked):
        assert torch.equal(keep, stable_keep(matrix, spec))


@pytest.mark.parametrize("setting", ["0.5-row", "0.5-matrix", "2:4", "3:16"])
def test_the_kthvalue_path_gpus_take_masks_like_a_stable_sort(setting):
    """Off the CPU's float32 path (here: float64) thresholds come from torch.kthvalue (short N:M groups:
    the sorting network) and ties are counted with torch: the same masks, ties included."""
    from pruning_core.masks import keep_above_lowest

    generator = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 4, (6, 32), generator=generator).double()
    if ":" in setting:
        n, m = map(int, setting.split(":"))
        spec = SparsitySpec(n / m, n, m)
        keep = keep_above_lowest(scores.reshape(6, 32 // m, m), n).reshape(6, 32)
    else:
        sparsity, group = setting.split("-")
        spec = SparsitySpec(float(sparsity), group=group)
        flat = scores.reshape(1, -1) if spec.whole_matrix else scores
        keep = keep_above_lowest(flat, round(spec.sparsity * flat.shape[-1])).reshape(6, 32)
    assert torch.equal(keep, stable_keep(scores, spec))
