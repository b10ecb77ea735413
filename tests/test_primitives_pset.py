"""The DEAP primitive set and conversions between DEAP trees, formula trees and text."""

from __future__ import annotations

import random

import pytest
import torch
from deap import gp

from primitives import KNOWN_FORMULAS, canonical_key, compile_formula, parse_formula
from primitives.pset import deap_to_text, deap_to_tree, make_pset, tree_to_deap
from primitives.tree import Call, Const, Term
from pruning_core.errors import UsageError
from pruning_core.masks import keep_mask
from pruning_core.scorers.base import SparsitySpec


def test_deap_prefix_list_becomes_the_same_tree():
    pset = make_pset()
    individual = gp.PrimitiveTree(
        [pset.mapping["mul"], pset.mapping["abs"], pset.mapping["W"], pset.mapping["sqrt"], pset.mapping["X"]]
    )
    assert deap_to_tree(individual) == Call("mul", (Call("abs", (Term("W"),)), Call("sqrt", (Term("X"),))))
    assert deap_to_text(individual) == "abs(W) * sqrt(X)"


def test_random_gp_trees_round_trip_through_text():
    random.seed(0)
    pset = make_pset()
    for _ in range(300):
        individual = gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 6))
        tree = deap_to_tree(individual)
        assert str(tree_to_deap(tree, pset)) == str(individual)
        assert tree_to_deap(deap_to_text(individual), pset) == individual


def test_deap_string_form_matches_the_formula_tree():
    """DEAP's own printer uses prefix call syntax; reading it as a formula gives the same tree."""
    random.seed(1)
    pset = make_pset()
    for _ in range(100):
        individual = gp.PrimitiveTree(gp.genGrow(pset, 1, 4))
        assert parse_formula(str(individual)) == deap_to_tree(individual)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "pruner-zero", "ria", "sparsegpt-mask"])
def test_known_formulas_convert_without_changing_their_key(name):
    individual = tree_to_deap(KNOWN_FORMULAS[name], make_pset())
    assert canonical_key(deap_to_tree(individual)) == canonical_key(KNOWN_FORMULAS[name])


def test_z_pruner_powers_are_the_power_primitives():
    """X^1.5 is pow3_2(X) and zsn(...)^3 is pow3(zsn(...)); no sqr / sqrt expansion left."""
    individual = tree_to_deap(KNOWN_FORMULAS["z-pruner"], make_pset(), add_constants=True)
    names = [node.name for node in individual if isinstance(node, gp.Primitive)]
    assert names.count("pow3") == 2 and names.count("pow3_2") == 1
    assert "sqrt" not in names and "sqr" not in names


def test_powers_become_gp_primitives_with_the_same_masks():
    pset = make_pset()
    weight, x = torch.randn(4, 6), torch.rand(6) + 0.5
    for exponent in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, -1.5, 0.25, 1 / 3, 2 / 3, -1 / 3, 4.5):
        tree = deap_to_tree(tree_to_deap(f"W^{exponent!r} * X", pset))
        scores = compile_formula(tree, "matrix")(weight, {"X": x})
        want = weight.abs() ** exponent * x[None, :]
        for spec in (SparsitySpec(0.5), SparsitySpec(0.5, group="matrix")):
            assert torch.equal(keep_mask(scores, spec), keep_mask(want, spec)), exponent


def test_inexpressible_formulas_are_usage_errors():
    pset = make_pset()
    with pytest.raises(UsageError, match="0.5"):
        tree_to_deap("W^0.3", pset)
    with pytest.raises(UsageError, match="constant 0.7"):
        tree_to_deap(KNOWN_FORMULAS["z-pruner"], pset)


def test_missing_constants_can_be_added_on_request():
    pset = make_pset()
    individual = tree_to_deap(KNOWN_FORMULAS["z-pruner"], pset, add_constants=True)
    assert canonical_key(deap_to_tree(individual)) == canonical_key(KNOWN_FORMULAS["z-pruner"])
    assert deap_to_tree(gp.PrimitiveTree([pset.mapping["0.7"]])) == Const(0.7)
