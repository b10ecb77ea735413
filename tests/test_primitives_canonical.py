"""Canonical keys: equal keys give identical masks, and the compiled canonical form orders scores as
an independent float64 evaluation of the original tree does (wherever that evaluation is well
conditioned: no saturation, no near-zero denominators, no near-ties at the mask boundary)."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from primitives import KNOWN_FORMULAS, OPS, canonical_key, compile_formula, format_formula
from primitives.compile import CompiledFormula
from primitives.grammar import parse_formula
from primitives.tree import Call, Const, Term
from pruning_core.masks import keep_mask
from pruning_core.scorers.base import SparsitySpec

UNARY = [name for name, op in OPS.items() if op.arity == 1]
BINARY = [name for name, op in OPS.items() if op.arity == 2 and name != "pow"]
leaves = st.sampled_from([Term(n) for n in "WXGHU"] + [Const(c) for c in (0.5, 1.0, 2.0, 3.0)])


def _extend(children):
    return st.one_of(
        st.tuples(st.sampled_from(UNARY), children).map(lambda t: Call(t[0], (t[1],))),
        st.tuples(st.sampled_from(BINARY), children, children).map(lambda t: Call(t[0], (t[1], t[2]))),
        st.tuples(children, st.sampled_from([0.5, 1.5, 2.0, 3.0, -1.0, 0.25, 1 / 3, 2 / 3])).map(
            lambda t: Call("pow", (t[0], Const(t[1])))
        ),
    )


trees = st.recursive(leaves, _extend, max_leaves=8)
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # deterministic in CI; explore more with --hypothesis-seed and more examples
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)


# --- independent float64 reference of the ideal operators ---------------------------------------


class Unstable(Exception):
    """The float64 reference is in a regime where float32 or protection may legitimately differ."""


def _require(condition: bool) -> None:
    if not condition:
        raise Unstable


def _full(x, shape):
    return x.expand(shape) if x.dim() else torch.full(shape, float(x), dtype=torch.float64)


def _spread_ok(x):
    """Matrix statistics of a (numerically) constant matrix are noise: accept exact constants only."""
    spread = float(x.max() - x.min())
    _require(spread == 0 or spread > 1e-6 * float(x.abs().max()))
    return spread > 0


def _reference_op(op, args, shape):
    x = args[0]
    if op in ("add", "sub"):
        y = args[1] if op == "add" else -args[1]
        total = x + y
        noise = (total != 0) & (total.abs() < 1e-9 * (x.abs() + y.abs()))
        _require(not bool(noise.any()))  # catastrophic cancellation
        return total
    if op == "mul":
        return x * args[1]
    if op == "div":
        _require(float(args[1].abs().min()) > 1e-6)
        return x / args[1]
    if op == "abs":
        return x.abs()
    if op == "neg":
        return -x
    if op == "sqr":
        return x * x
    if op == "sqrt":
        return x.abs().sqrt()
    if op == "log":
        _require(float(x.abs().min()) > 1e-6)
        return x.abs().log()
    if op == "exp":
        _require(float(x.max()) < 30)
        return x.exp()
    if op == "tanh":
        _require(float(x.abs().max()) < 4)
        return torch.tanh(x)
    if op == "sigmoid":
        _require(float(x.abs().max()) < 8)
        return 1 / (1 + torch.exp(-x))
    x = _full(x, shape)
    if op == "mms":
        return (x - x.min()) / (x.max() - x.min()) if _spread_ok(x) else torch.zeros(shape, dtype=x.dtype)
    if op == "zsn":
        return (x - x.mean()) / x.std() if _spread_ok(x) else torch.zeros(shape, dtype=x.dtype)
    if op in ("rownorm", "colnorm", "rowl2", "coll2"):
        dim = 1 if op.startswith("row") else 0
        norm = (
            x.abs().sum(dim, keepdim=True) if op.endswith("norm") else (x * x).sum(dim, keepdim=True).sqrt()
        )
        # An all-zero row / column stays zero (the kernels divide it by 1); near-zero norms are noise.
        zero = norm == 0
        _require(bool((zero | (norm > 1e-9 * norm.max())).all()))
        return x / torch.where(zero, torch.ones_like(norm), norm)
    if op == "lowfrac":
        threshold = 0.1 * x.abs().mean()
        _require(float(((x.abs() - threshold).abs() / threshold.clamp_min(1e-300)).min()) > 1e-4)
        return (x.abs() < threshold).double().mean()
    raise AssertionError(op)


def reference(tree, env, shape):
    if isinstance(tree, Term):
        return env[tree.name]
    if isinstance(tree, Const):
        return torch.tensor(tree.value, dtype=torch.float64)
    if tree.op == "pow":
        base, exponent = reference(tree.args[0], env, shape).abs(), tree.args[1].value
        _require(exponent > 0 or float(base.min()) > 1e-6)
        result = base**exponent
    else:
        result = _reference_op(tree.op, [reference(a, env, shape) for a in tree.args], shape)
    magnitude = result.abs()
    nonzero = magnitude[magnitude > 0]
    _require(float(magnitude.max()) < 1e15 and (nonzero.numel() == 0 or float(nonzero.min()) > 1e-20))
    return result


def make_data(seed, rows=6, cols=8):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    inputs = torch.randn(cols, 3 * cols, generator=gen)
    hessian = 2.0 / inputs.shape[1] * inputs @ inputs.T
    stats = {"X": torch.rand(cols, generator=gen) + 0.5, "G": torch.rand(rows, cols, generator=gen) + 0.1}
    stats["hessian"] = hessian
    damped = hessian.double() + 0.01 * torch.diagonal(hessian).double().mean() * torch.eye(
        cols, dtype=torch.float64
    )
    hinv = torch.diagonal(torch.linalg.inv(damped))[None, :]
    w = weight.double()
    env = {
        "W": w,
        "X": stats["X"].double()[None, :],
        "G": stats["G"].double(),
        "H": hinv,
        "U": w.abs() / hinv,
    }
    return weight, stats, env


SPECS = {"row": [SparsitySpec(0.5), SparsitySpec(0.5, 2, 4)], "matrix": [SparsitySpec(0.5, group="matrix")]}


def _decisive(scores: torch.Tensor, spec: SparsitySpec) -> bool:
    """The mask boundary of every group is separated by more than float32 evaluation error."""
    if spec.is_nm:
        groups, k = scores.reshape(-1, spec.m), spec.n
    elif spec.group == "row":
        groups, k = scores, round(spec.sparsity * scores.shape[1])
    else:
        groups, k = scores.reshape(1, -1), round(spec.sparsity * scores.numel())
    ordered = groups.sort(dim=1).values
    gap = (ordered[:, k] - ordered[:, k - 1]).min()
    return float(gap) > 1e-4 * float(scores.abs().max())


def reference_masks(tree, env, shape, group):
    """Reference masks, or None where the reference is not well conditioned."""
    try:
        scores = _full(reference(tree, env, shape), shape)
    except Unstable:
        return None
    if not all(_decisive(scores, spec) for spec in SPECS[group]):
        return None
    return [keep_mask(scores, spec) for spec in SPECS[group]]


def compiled_masks(tree, weight, stats, group):
    scores = compile_formula(tree, group)(weight, stats)
    assert scores.dtype == torch.float32 and scores.shape == weight.shape
    assert torch.isfinite(scores).all()
    return [keep_mask(scores, spec) for spec in SPECS[group]]


# --- properties ---------------------------------------------------------------------------------


@SETTINGS
@given(trees, st.integers(0, 2**16), st.sampled_from(["row", "matrix"]))
def test_compiled_canonical_form_orders_like_the_original_tree(tree, seed, group):
    weight, stats, env = make_data(seed)
    want = reference_masks(tree, env, weight.shape, group)
    assume(want is not None)
    got = compiled_masks(tree, weight, stats, group)
    for spec, mask_got, mask_want in zip(SPECS[group], got, want):
        assert torch.equal(mask_got, mask_want), (format_formula(tree), canonical_key(tree, group), spec)


def _wrappers(group):
    """Maps that never change any mask of ``group``: the canonical key must see through them."""
    lowfrac_g = Call("lowfrac", (Term("G"),))
    wrap = [
        lambda t: Call("exp", (t,)),
        lambda t: Call("tanh", (t,)),
        lambda t: Call("sigmoid", (t,)),
        lambda t: Call("mms", (t,)),
        lambda t: Call("zsn", (t,)),
        lambda t: Call("add", (t, Const(3.0))),
        lambda t: Call("sub", (t, lowfrac_g)),
        lambda t: Call("mul", (Const(2.0), t)),
        lambda t: Call("div", (t, Const(3.0))),
        lambda t: Call("mul", (t, Call("exp", (lowfrac_g,)))),
        lambda t: Call("neg", (Call("neg", (t,)),)),
        lambda t: Call("log", (Call("exp", (t,)),)),
        lambda t: Call("sqr", (Call("exp", (t,)),)),
        lambda t: Call("pow", (Call("exp", (t,)), Const(1.5))),
    ]
    if group == "row":
        wrap += [lambda t: Call("rownorm", (t,)), lambda t: Call("rowl2", (t,))]
    return wrap


@SETTINGS
@given(trees, st.data(), st.integers(0, 2**16), st.sampled_from(["row", "matrix"]))
def test_same_canonical_key_gives_identical_masks(tree, data, seed, group):
    """A tree and rank-preserving rewrites of it share one key and one mask; where the float64
    reference of the original is well conditioned, that mask is the reference's mask."""
    wrappers = _wrappers(group)
    variant = tree
    for index in data.draw(st.lists(st.integers(0, len(wrappers) - 1), min_size=1, max_size=3)):
        variant = wrappers[index](variant)
    key = canonical_key(tree, group)
    assert canonical_key(variant, group) == key, format_formula(variant)
    weight, stats, env = make_data(seed)
    masks = compiled_masks(tree, weight, stats, group)
    for mask, other in zip(masks, compiled_masks(variant, weight, stats, group)):
        assert torch.equal(mask, other)
    want = reference_masks(tree, env, weight.shape, group)
    if want is not None:
        assert all(torch.equal(a, b) for a, b in zip(masks, want)), (format_formula(tree), key)


@settings(max_examples=150, deadline=None)
@given(trees, st.sampled_from(["row", "matrix"]))
def test_canonical_key_is_idempotent(tree, group):
    key = canonical_key(tree, group)
    assert canonical_key(key, group) == key


# --- examples -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first, second, group",
    [
        ("abs(W) * X", "X * abs(W)", "row"),
        ("abs(W) * X", "sqr(W) * sqr(X)", "matrix"),
        ("abs(W) * X", "log(abs(W) * X)", "matrix"),
        ("abs(W) * X", "rownorm(abs(W)) * X", "row"),
        ("abs(W) * X", "exp(tanh(2 * abs(W) * X + 1))", "matrix"),
        ("sqr(W) / sqr(H)", "sqr(U)", "matrix"),
        ("sqr(W) / sqr(H)", "abs(W) / H", "matrix"),
        ("W", "-(-W)", "matrix"),
        ("W", "log(exp(W))", "matrix"),
        ("abs(W)", "sqrt(sqr(W))", "matrix"),
        ("abs(W)", "abs(abs(W))", "matrix"),
        ("W * X - X * W + G", "G", "matrix"),
        ("1 / (X * G)", "-(X * G)", "matrix"),
        ("mms(2 * W + 1)", "zsn(W)", "matrix"),
        ("W / W", "3", "matrix"),
        ("lowfrac(W) * 2 + 1", "0", "row"),
        ("colnorm(X) * W", "W", "row"),  # a column normalization of a column statistic is 1 / rows
        ("exp(W) * abs(W)", "W + log(W)", "matrix"),
        ("log(W) + log(X)", "abs(W) * X", "matrix"),
    ],
)
def test_equivalent_formulas_share_a_key(first, second, group):
    assert canonical_key(first, group) == canonical_key(second, group)


@pytest.mark.parametrize(
    "first, second, group",
    [
        ("W", "abs(W)", "matrix"),
        ("abs(W) * X", "abs(W) * G", "row"),
        ("abs(W) * X", "rownorm(abs(W)) * X", "matrix"),  # the row factor matters across rows
        ("abs(W) * X", "colnorm(abs(W)) * X", "row"),
        ("W", "-W", "row"),
        ("abs(W) + X", "abs(W) + 2 * X", "row"),
        ("sqr(W) * mms(G)", "abs(W) * mms(G)", "row"),
    ],
)
def test_different_formulas_get_different_keys(first, second, group):
    assert canonical_key(first, group) != canonical_key(second, group)


def test_known_formulas_different_from_each_other():
    keys = {canonical_key(text, "row") for text in KNOWN_FORMULAS.values()}
    assert len(keys) == len(KNOWN_FORMULAS)


def test_constant_formula_prunes_by_the_stable_tie_break():
    weight, stats, _ = make_data(0)
    scores = compile_formula("W / W + lowfrac(G)")(weight, stats)
    assert torch.equal(keep_mask(scores, SparsitySpec(0.5)), keep_mask(torch.zeros(6, 8), SparsitySpec(0.5)))


def test_division_by_an_exact_zero_keeps_its_protected_meaning():
    """W / (X - X) is W / 1e-12 (the floor is positive), which orders like W; SymPy alone would say zoo."""
    weight, stats, _ = make_data(1)
    assert canonical_key("W / (X - X)") == canonical_key("W")
    assert canonical_key("X / (2 / (G - G))") == canonical_key("X")  # X / 2e12, not 0
    scores = compile_formula("W / (X - X)")(weight, stats)
    want = weight / torch.full_like(weight, 1e-12)
    for spec in SPECS["row"] + SPECS["matrix"]:
        assert torch.equal(keep_mask(scores, spec), keep_mask(want, spec))


def test_bad_group_is_a_usage_error():
    from pruning_core.errors import UsageError

    with pytest.raises(UsageError, match="group"):
        canonical_key("W", "column")


# --- column normalizations of per-column values --------------------------------------------------


def _column_norm64(v, rows, l2):
    """x / (column sum of |x| or column L2 norm) on the expanded matrix, written out in float64; an
    all-zero column stays zero (the kernels' protection)."""
    m = v.expand(rows, v.shape[1])
    norm = (m * m).sum(0, keepdim=True).sqrt() if l2 else m.abs().sum(0, keepdim=True)
    return m / torch.where(norm > 0, norm, torch.ones_like(norm))


def _mms64(v):
    return (v - v.min()) / (v.max() - v.min())


def _column_data(seed=5, rows=6, cols=8):
    """W, strictly positive X and H; mms(H) is exactly zero in H's smallest column."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    x, h = torch.rand(cols, generator=gen) + 0.5, torch.rand(cols, generator=gen) + 0.5
    env = {"W": weight.double(), "X": x.double()[None, :], "H": h.double()[None, :]}
    return weight, {"X": x, "H": h}, env


def _column_norms64(rows: int):
    """colnorm and coll2 written directly in float64, for matrices with ``rows`` rows."""
    return (functools.partial(_column_norm64, rows=rows, l2=False),
            functools.partial(_column_norm64, rows=rows, l2=True))  # fmt: skip


def _direct_scores(env):
    """Each formula written directly in float64 (no tree, no kernels)."""
    w, x, h = env["W"], env["X"], env["H"]
    colnorm, coll2 = _column_norms64(w.shape[0])
    return {
        "abs(W)": w.abs(),
        "-abs(W)": -w.abs(),
        "W": w,
        "abs(W) * coll2(mms(H))": w.abs() * coll2(_mms64(h)),
        "abs(W) * colnorm(mms(H))": w.abs() * colnorm(_mms64(h)),
        "abs(W) * coll2(1 - mms(H))": w.abs() * coll2(1 - _mms64(h)),
        "abs(W) * coll2(H)": w.abs() * coll2(h),
        "abs(W) * colnorm(exp(mms(H)))": w.abs() * colnorm(_mms64(h).exp()),
        "abs(W) * coll2(-H)": w.abs() * coll2(-h),
        "colnorm(X) * W": colnorm(x) * w,
        "coll2(X * H) * W": coll2(x * h) * w,
    }


def test_column_normalizations_share_a_key_only_with_identical_masks():
    """Against the direct float64 formulas: equal keys imply equal row-wise 50% masks, and the compiled
    canonical form gives the direct formula's mask. mms(H) has a zero column, so coll2(mms(H)) is not
    a constant and abs(W) * coll2(mms(H)) must not fold to abs(W)."""
    weight, stats, env = _column_data()
    spec = SparsitySpec(0.5)
    assert int((_mms64(env["H"]) == 0).sum()) == 1
    masks = {text: keep_mask(scores, spec) for text, scores in _direct_scores(env).items()}
    keys = {text: canonical_key(text) for text in masks}
    for text, mask in masks.items():
        assert torch.equal(keep_mask(compile_formula(text)(weight, stats), spec), mask), text
    for first, second in itertools.combinations(masks, 2):
        if keys[first] == keys[second]:
            assert torch.equal(masks[first], masks[second]), (first, second)
    assert not torch.equal(masks["abs(W) * coll2(mms(H))"], masks["abs(W)"])
    assert keys["abs(W) * coll2(mms(H))"] != keys["abs(W)"]
    assert keys["abs(W) * colnorm(mms(H))"] != keys["abs(W)"]
    assert keys["abs(W) * coll2(1 - mms(H))"] != keys["abs(W)"]
    # strictly positive (negative) per-column values still fold
    assert keys["abs(W) * coll2(H)"] == keys["abs(W) * colnorm(exp(mms(H)))"] == keys["abs(W)"]
    assert keys["abs(W) * coll2(-H)"] == keys["-abs(W)"]
    assert keys["colnorm(X) * W"] == keys["coll2(X * H) * W"] == keys["W"]


def test_a_zero_x_column_is_outside_the_fold_like_x_over_x():
    """X is a norm and may be 0 in a dead column; SymPy takes X > 0 (terminals.SYMBOLS), as it does for
    W * X / X = W. At X_j = 0 both folds leave ideal math in the same way: the protected value is 0 in
    that column (0 / 1 and 0 / 1e-12), not W."""
    weight, _, env = _column_data()
    x = env["X"].clone()
    x[0, 3] = 0.0
    rows, w = weight.shape[0], env["W"]
    colnorm_x = _column_norm64(x, rows, l2=False) * w
    protected_x_over_x = w * x / torch.where(x == 0, torch.full_like(x, 1e-12), x)
    assert torch.equal(colnorm_x[:, 3], torch.zeros(rows, dtype=torch.float64))
    assert torch.equal(protected_x_over_x[:, 3], torch.zeros(rows, dtype=torch.float64))
    assert canonical_key("colnorm(X) * W") == canonical_key("W * X / X") == canonical_key("W")


# --- positive per-column factors inside a column normalization ------------------------------------


def _protected_div64(x, y):
    """x / y with |y| floored at 1e-12 keeping its sign, 0 counting as positive (the protected div)."""
    return x / torch.where(y.abs() < 1e-12, torch.where(y < 0, -1e-12, 1e-12).to(y.dtype), y)


def _factor_scores(env):
    """Each formula written directly in float64 (no tree, no kernels)."""
    w, x, h = env["W"], env["X"], env["H"]
    colnorm, coll2 = _column_norms64(w.shape[0])
    return {
        "colnorm(abs(W))": colnorm(w.abs()),
        "coll2(abs(W))": coll2(w.abs()),
        "X * colnorm(abs(W))": x * colnorm(w.abs()),
        "X * colnorm(abs(W) / H)": x * colnorm(w.abs() / h),
        "colnorm(abs(W) * sqrt(X))": colnorm(w.abs() * x.sqrt()),
        "coll2(U * X)": coll2(w.abs() / h * x),
        # inv(mms(H)) is 1e12 in mms(H)'s zero column: still a positive per-column factor
        "colnorm(abs(W) / mms(H))": colnorm(_protected_div64(w.abs(), _mms64(h))),
        # mms(H) is 0 in one column, which then stays 0: not a positive factor
        "colnorm(abs(W) * mms(H))": colnorm(w.abs() * _mms64(h)),
        "colnorm(abs(W) + X)": colnorm(w.abs() + x),
    }


SAME_MASK = [
    ("X * colnorm(abs(W) / H)", "X * colnorm(abs(W))"),
    ("colnorm(abs(W) * sqrt(X))", "colnorm(abs(W))"),
    ("coll2(U * X)", "coll2(abs(W))"),
    ("colnorm(abs(W) / mms(H))", "colnorm(abs(W))"),
]
DIFFERENT_MASK = [
    ("colnorm(abs(W) * mms(H))", "colnorm(abs(W))"),  # a factor that is 0 in a column is kept
    ("colnorm(abs(W) + X)", "colnorm(abs(W))"),  # a term, not a factor
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("group", ["row", "matrix"])
def test_positive_column_factors_drop_out_of_column_normalizations(group, seed):
    """A column normalization divides each column by its own norm, so a strictly positive per-column
    factor cancels: the pairs share a key, and their direct float64 row-wise 50% masks are identical.
    A factor that is zero in a column, or a per-column term, changes the masks and keeps its key."""
    weight, stats, env = _column_data(seed)
    spec = SparsitySpec(0.5)
    assert int((_mms64(env["H"]) == 0).sum()) == 1
    masks = {text: keep_mask(scores, spec) for text, scores in _factor_scores(env).items()}
    for text, mask in masks.items():
        # the compiled canonical form, and the protected kernels on the tree as written, give the
        # direct formula's mask
        assert torch.equal(keep_mask(compile_formula(text, group)(weight, stats), spec), mask), text
        as_written = CompiledFormula(text, parse_formula(text))(weight, stats)
        assert torch.equal(keep_mask(as_written, spec), mask), text
    for first, second in SAME_MASK:
        assert torch.equal(masks[first], masks[second]), (first, second)
        assert canonical_key(first, group) == canonical_key(second, group), (first, second)
    for first, second in DIFFERENT_MASK:
        assert not torch.equal(masks[first], masks[second]), (first, second)
        assert canonical_key(first, group) != canonical_key(second, group), (first, second)


@pytest.mark.parametrize(
    "first, second",
    [
        ("colnorm(abs(W) * X * H)", "colnorm(abs(W))"),
        ("coll2(W * exp(mms(H)))", "coll2(W)"),  # exp(...) > 0 even where mms(H) = 0
        ("colnorm(W * mms(H) * X)", "colnorm(W * mms(H))"),  # only the positive factor goes
        ("colnorm(colnorm(abs(W)) * X)", "colnorm(abs(W))"),
        ("coll2(-3 * W / X)", "-coll2(W)"),
    ],
)
def test_positive_column_factor_keys(first, second):
    assert canonical_key(first, "matrix") == canonical_key(second, "matrix")


@pytest.mark.parametrize(
    "first, second",
    [
        ("colnorm(W * mms(H))", "colnorm(W)"),
        ("colnorm(W * G)", "colnorm(W)"),  # G is per weight
        ("colnorm(W * (X - H))", "colnorm(W)"),  # sign unknown, may be 0
        ("rownorm(abs(W) / H)", "rownorm(abs(W))"),  # one factor per column is not one per row
        ("rowl2(W * X)", "rowl2(W)"),
    ],
)
def test_factors_that_are_not_positive_per_column_stay(first, second):
    assert canonical_key(first, "matrix") != canonical_key(second, "matrix")
