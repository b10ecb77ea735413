"""Every operator and terminal against a direct formula written here; finite output on extreme input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from primitives import OPS, compile_formula
from primitives.pset import make_pset
from pruning_core.errors import UsageError

torch.manual_seed(0)
A = torch.randn(5, 7, dtype=torch.float64) * 3
B = torch.randn(5, 7, dtype=torch.float64) * 3 + 0.5


def _zscore(a):
    mean = a.mean()
    return (a - mean) / math.sqrt(float(((a - mean) ** 2).sum()) / (a.numel() - 1))


UNARY = {
    "abs": lambda a: a.abs(),
    "neg": lambda a: -a,
    "sqr": lambda a: a * a,
    "sqrt": lambda a: a.abs() ** 0.5,
    "log": lambda a: torch.log(a.abs() + 1e-12),
    "exp": lambda a: torch.exp(torch.minimum(a, torch.tensor(60.0, dtype=a.dtype))),
    "tanh": lambda a: (torch.exp(2 * a) - 1) / (torch.exp(2 * a) + 1),
    "sigmoid": lambda a: 1 / (1 + torch.exp(-a)),
    "mms": lambda a: (a - a.min()) / (a.max() - a.min()),
    "zsn": _zscore,
    "rownorm": lambda a: a / a.abs().sum(dim=1, keepdim=True),
    "colnorm": lambda a: a / a.abs().sum(dim=0, keepdim=True),
    "rowl2": lambda a: a / (a * a).sum(dim=1, keepdim=True) ** 0.5,
    "coll2": lambda a: a / (a * a).sum(dim=0, keepdim=True) ** 0.5,
    "lowfrac": lambda a: torch.tensor(
        sum(float(v) < 0.1 * float(a.abs().mean()) for v in a.abs().flatten()) / a.numel()
    ),
}
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}


def test_the_table_covers_exactly_the_documented_operators():
    assert set(OPS) == set(UNARY) | set(BINARY) | {"pow"}
    assert all(OPS[name].arity == 1 for name in UNARY) and all(OPS[name].arity == 2 for name in BINARY)


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_operator_matches_direct_formula(name):
    got = OPS[name].kernel(A.float())
    want = UNARY[name](A).float()
    assert got.dtype == torch.float32
    assert torch.allclose(
        got.expand_as(A) if got.dim() == 0 else got, want.expand_as(A), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_operator_matches_direct_formula(name):
    got = OPS[name].kernel(A.float(), B.float())
    assert torch.allclose(got, BINARY[name](A, B).float(), rtol=1e-5, atol=1e-6)


def test_div_floors_small_denominators_keeping_their_sign():
    y = torch.tensor([0.0, -0.0, 1e-15, -1e-15, -2e-12, 0.5])
    got = OPS["div"].kernel(torch.ones(6), y)
    want = torch.tensor([1e12, 1e12, 1e12, -1e12, -0.5e12, 2.0])
    assert torch.allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("exponent", [1.5, 3.0, 0.5, -1.0, -2.5, 0.0])
def test_pow_is_protected_power_of_the_magnitude(exponent):
    got = OPS["pow"].kernel(A.float(), exponent)
    base = A.abs()
    if exponent < 0:
        base = base.clamp_min(1e-12)
    assert torch.allclose(got, (base**exponent).float(), rtol=1e-5)
    at_zero = 1.0 if exponent == 0 else 0.0 if exponent > 0 else min(1e-12**exponent, 1e30)
    assert torch.allclose(OPS["pow"].kernel(torch.zeros(2), exponent), torch.full((2,), at_zero), rtol=1e-6)


def test_matrix_statistics_of_a_constant_matrix_are_zero():
    for name in ("mms", "zsn"):
        assert torch.equal(OPS[name].kernel(torch.full((3, 4), -2.5)), torch.zeros(3, 4))
    for name in ("rownorm", "colnorm", "rowl2", "coll2"):
        assert torch.equal(OPS[name].kernel(torch.zeros(3, 4)), torch.zeros(3, 4))


EXTREMES = torch.tensor(
    [
        0.0,
        -0.0,
        1e-45,
        -1e-45,
        1e-38,
        -1e-38,
        1e-12,
        -1e-12,
        1.0,
        -1.0,
        1e30,
        -1e30,
        3.4e38,
        -3.4e38,
        88.0,
        -88.0,
    ]
)


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_operators_stay_finite_on_extreme_input(name):
    matrix = EXTREMES.reshape(4, 4)
    for x in (matrix, matrix.T.contiguous(), torch.full((4, 4), 3.4e38), torch.full((4, 4), -1e-45)):
        assert torch.isfinite(OPS[name].kernel(x)).all(), x


@pytest.mark.parametrize("name", [*sorted(BINARY), "pow"])
def test_binary_operators_stay_finite_on_extreme_input(name):
    x, y = (t.reshape(-1) for t in torch.meshgrid(EXTREMES, EXTREMES, indexing="ij"))
    if name == "pow":
        for exponent in (-100.0, -3.0, -0.5, 0.0, 0.5, 3.0, 100.0):
            assert torch.isfinite(OPS["pow"].kernel(x, exponent)).all()
    else:
        assert torch.isfinite(OPS[name].kernel(x, y)).all()


def test_random_formulas_stay_finite_on_extreme_weights():
    """Deep random GP trees over every operator, scored on weights holding extreme values."""
    import random

    from deap import gp

    from primitives.pset import deap_to_tree

    random.seed(3)
    pset = make_pset()
    weight = EXTREMES[torch.randint(len(EXTREMES), (6, 8), generator=torch.Generator().manual_seed(1))]
    stats = {"X": EXTREMES.abs()[:8], "G": weight.abs().flip(0), "H": torch.tensor([1e-30, 1e30] * 4)}
    for _ in range(150):
        tree = deap_to_tree(gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 5)))
        scores = compile_formula(tree)(weight, stats)
        assert torch.isfinite(scores).all(), tree


def _stats(out=4, columns=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(columns, 40, generator=gen)
    return {
        "X": torch.rand(columns, generator=gen) + 0.5,
        "G": torch.rand(out, columns, generator=gen),
        "hessian": 2.0 / 40 * inputs @ inputs.T,
    }


def _inverse_hessian_diag(hessian):
    """SparseGPT's dampening written out: H + 0.01 mean(diag H) I, then the diagonal of its inverse."""
    damped = hessian.double() + 0.01 * torch.diagonal(hessian).double().mean() * torch.eye(hessian.shape[0])
    return torch.diagonal(torch.linalg.inv(damped)).float()


def test_terminals_broadcast_per_column_statistics_over_rows():
    weight = torch.randn(4, 6)
    stats = _stats()
    hinv = _inverse_hessian_diag(stats["hessian"])
    cases = {
        "G * W": stats["G"] * weight,
        "X * W": stats["X"][None, :] * weight,
        "H * W": hinv[None, :] * weight,
        "U * G": weight.abs() / hinv[None, :] * stats["G"],
    }
    for text, want in cases.items():
        got = compile_formula(text, "matrix")(weight, stats)
        assert torch.allclose(got, want, rtol=1e-4), text
    precomputed = {"H": hinv, "G": stats["G"]}
    assert torch.allclose(compile_formula("U * G")(weight, precomputed), cases["U * G"], rtol=1e-5)


def test_scores_never_alias_the_weight_or_a_statistic():
    """Every operator on W and on G (a float32 statistic the terminal passes through): writing the scores
    leaves the inputs as they were."""
    weight, g = torch.randn(3, 4), torch.randn(3, 4)
    texts = ["W", "G"]
    for name, op in OPS.items():
        if name != "pow":
            texts += [f"{name}(W)", f"{name}(G)"] if op.arity == 1 else [f"{name}(W, G)", f"{name}(G, W)"]
    for text in texts:
        before = weight.clone(), g.clone()
        compile_formula(text, "matrix")(weight, {"G": g}).fill_(7.0)
        assert torch.equal(weight, before[0]) and torch.equal(g, before[1]), text


def test_missing_statistic_is_a_usage_error():
    with pytest.raises(UsageError, match="'G'"):
        compile_formula("W * G")(torch.randn(3, 4), {"X": torch.ones(4)})


def test_every_table_operator_is_in_the_gp_set_pow_as_one_primitive_per_exponent():
    pset = make_pset()
    names = {p.name for p in itertools.chain.from_iterable(pset.primitives.values())}
    assert names == set(OPS) - {"pow"} | {"pow1_4", "pow1_3", "pow2_3", "pow3_2", "pow3"}
    terminals = {t.format() for t in itertools.chain.from_iterable(pset.terminals.values())}
    assert terminals == {"W", "X", "G", "H", "U", "0.5", "1.0", "2.0", "3.0"}
