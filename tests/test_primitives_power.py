"""The GP's power primitives |x|^c: kernels, DEAP <-> tree <-> text conversions, exact exponents in
canonical keys."""

from __future__ import annotations

import pickle
import random
from fractions import Fraction

import sympy
import torch
from deap import gp

from primitives import canonical_key, format_formula, parse_formula
from primitives.compile import CompiledFormula
from primitives.kernels import k_pow
from primitives.ops import POWER_EXPONENTS
from primitives.pset import deap_to_text, deap_to_tree, make_pset, tree_to_deap
from primitives.symbolic import to_sympy
from primitives.terminals import SYMBOLS
from primitives.tree import Call, Const, Term, depth, size

EXPONENTS = [1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 2, 2.0, 3.0]
PRIMITIVE_EXPONENTS = {"pow1_4": 1 / 4, "pow1_3": 1 / 3, "pow2_3": 2 / 3, "pow3_2": 3 / 2, "pow3": 3.0}
SAME_AS_OP = {1 / 2: "sqrt", 2.0: "sqr"}  # existing operators that already are these powers


def _values_with_zeros():
    x = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4
    x[::7] = 0.0
    return x


def test_exponent_table_is_the_expected_set():
    assert [float(c) for c in POWER_EXPONENTS] == EXPONENTS


def test_power_kernel_is_abs_power_in_float64():
    x = _values_with_zeros()
    for exponent in EXPONENTS:
        assert torch.equal(k_pow(x, exponent), torch.abs(x) ** exponent), exponent


def test_gp_primitives_compute_abs_power():
    pset = make_pset()
    x = _values_with_zeros()
    for name, exponent in PRIMITIVE_EXPONENTS.items():
        assert torch.equal(pset.context[name](x), torch.abs(x) ** exponent), name
        assert torch.equal(pickle.loads(pickle.dumps(pset.context[name]))(x), torch.abs(x) ** exponent)
    for exponent, name in SAME_AS_OP.items():
        assert torch.allclose(pset.context[name](x), torch.abs(x) ** exponent, rtol=1e-15, atol=0), name


def test_compiled_power_matches_float64_reference():
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    weight[0, 0] = 0.0
    for exponent in EXPONENTS:
        scores = CompiledFormula("pow", Call("pow", (Term("W"), Const(exponent))))(weight, {})
        want = weight.double().abs() ** exponent
        assert torch.allclose(scores.double(), want, rtol=1e-6, atol=0), exponent


def test_primitive_set_is_rebuilt_identically():
    def names(pset):
        return [p.name for p in pset.primitives[pset.ret]], [t.name for t in pset.terminals[pset.ret]]

    first, second = names(make_pset()), names(make_pset())
    assert first == second
    assert [n for n in first[0] if n.startswith("pow")] == list(PRIMITIVE_EXPONENTS)


def test_each_primitive_is_a_pow_node_and_comes_back():
    pset = make_pset()
    for name, exponent in PRIMITIVE_EXPONENTS.items():
        individual = gp.PrimitiveTree([pset.mapping[name], pset.mapping["X"]])
        tree = Call("pow", (Term("X"), Const(exponent)))
        assert deap_to_tree(individual) == tree
        assert parse_formula(format_formula(tree)) == tree
        assert parse_formula(str(individual)) == tree  # DEAP's printing: pow1_3(X)
        assert tree_to_deap(deap_to_text(individual), pset) == individual


def test_powers_and_their_inverses_map_to_primitives():
    pset = make_pset()
    m = pset.mapping
    for exponent in EXPONENTS:
        name = SAME_AS_OP.get(exponent) or next(n for n, c in PRIMITIVE_EXPONENTS.items() if c == exponent)
        assert list(tree_to_deap(f"W^{exponent!r}", pset)) == [m[name], m["W"]]
        assert list(tree_to_deap(f"W^-{exponent!r}", pset)) == [m["div"], m["1.0"], m[name], m["W"]]
    assert list(tree_to_deap("W^2.5", pset)) == [m["mul"], m["sqr"], m["W"], m["sqrt"], m["W"]]


def test_one_third_is_exact_for_sympy():
    assert to_sympy(parse_formula(f"X^{1 / 3!r}"), {}) == SYMBOLS["X"] ** sympy.Rational(1, 3)
    assert to_sympy(parse_formula(f"W^{2 / 3!r}"), {}) == sympy.Abs(SYMBOLS["W"]) ** sympy.Rational(2, 3)
    assert Fraction(1 / 3) != Fraction(1, 3)  # why the exponent needs mapping at all


def test_power_identities_in_canonical_keys():
    third, two_thirds = repr(1 / 3), repr(2 / 3)
    assert canonical_key(f"X^{third} * abs(W)") == canonical_key(f"abs(W) * X^{third}")
    assert canonical_key(f"(X^{third})^3") == canonical_key("X")
    assert canonical_key("pow3(pow1_3(W)) * X") == canonical_key("abs(W) * X")
    assert canonical_key(f"W^{third} * W^{two_thirds} * X") == canonical_key("abs(W) * X")
    assert canonical_key("W^0.25 * W^0.25 * X", "matrix") == canonical_key("sqrt(W) * X", "matrix")
    assert canonical_key(f"X^{third} * abs(W)") != canonical_key("X * abs(W)")


def test_canonical_keys_with_powers_are_idempotent():
    for text in ("pow1_4(W) * pow1_3(X) * pow3_2(G)", "pow2_3(W) / pow1_3(H) + X", "pow1_3(W - X) * G"):
        for group in ("row", "matrix"):
            key = canonical_key(text, group)
            assert canonical_key(key, group) == key, (text, key)


def test_random_gp_trees_round_trip_losslessly():
    pset = make_pset()
    with_power = 0
    for seed in range(200):
        random.seed(seed)
        individual = gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 3))
        text = deap_to_text(individual)
        back = tree_to_deap(text, pset)
        assert back == individual, text
        assert canonical_key(deap_to_tree(back)) == canonical_key(text), text
        # a pow's exponent is part of its node, so the formula counts the GP's nodes and levels
        assert size(parse_formula(text)) == len(individual), text
        assert depth(parse_formula(text)) == individual.height + 1, text
        with_power += any(node.name in PRIMITIVE_EXPONENTS for node in individual)
    assert with_power >= 20
