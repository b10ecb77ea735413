"""DEAP genetic programming over the formula primitive set: ramped half-and-half initialization,
tournament selection, subtree crossover, subtree / point / shrink mutation, elitism, and depth and
size limits against bloat.

DEAP's operators draw from the global ``random`` module. The engine owns a private ``random.Random``
and swaps its state into the global module only around those calls, so nothing else in the driver
(Ray, tqdm, libraries) can consume or disturb the search's random stream, and the stream is saved in
every checkpoint.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
from deap import gp

from fitness.evaluator import comparison_group as specs_group
from metric_search.config import SearchSettings
from metric_search.selection import best_unique, tournament
from primitives.canonical import canonical_key
from primitives.grammar import parse_formula
from primitives.printer import format_formula
from primitives.pset import deap_to_tree, make_pset, tree_to_deap
from primitives.tree import terminal_names
from pruning_core.errors import UsageError

MUTATIONS = ("subtree", "point", "shrink")
SUBTREE_MAX_DEPTH = 2  # depth of the random subtree a subtree mutation grafts in
# Extra subtree mutations of a child whose canonical form was measured before (canonical keys are
# cached, so a retry costs about a millisecond): 20 instead of 5 measure ~1.7x more distinct formulas
# in 10 generations of 20.
NOVELTY_RETRIES = 20
DRAWS_PER_MEMBER = 200  # generation 0 gives up (one clear error) after this many draws per missing member
WEIGHT_TERMINALS = frozenset({"W", "U"})  # a metric must read the weight it ranks


@dataclass
class Individual:
    tree: gp.PrimitiveTree
    formula: str  # the tree as formula text (what checkpoints hold)
    canonical: str  # the memo and ranking key; also the text that is evaluated


def comparison_group(settings: SearchSettings) -> str:
    """The canonical forms' group: one under which rank-equivalence holds for every setting."""
    return specs_group(settings.evaluator.specs)


def _probe_inputs():
    """Two weight matrices under one set of statistics (fixed, so the verdict is too)."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 8, 16, generator=generator)
    stats = {"X": torch.rand(16, generator=generator) + 0.1, "H": torch.rand(16, generator=generator) + 0.1,
             "G": torch.rand(8, 16, generator=generator)}  # fmt: skip
    return weights, stats


@lru_cache(maxsize=1 << 14)
def reads_weight(canonical: str) -> bool:
    """The formula depends on the weight it ranks: its canonical form names W (or U), and two different
    weight matrices get different scores (``abs(W / abs(W))`` names W but is 1 everywhere)."""
    if not terminal_names(parse_formula(canonical)) & WEIGHT_TERMINALS:
        return False
    from primitives.scorer import FormulaScorer

    scorer, (weights, stats) = FormulaScorer(canonical), _probe_inputs()
    return not torch.equal(scorer.score(weights[0], stats), scorer.score(weights[1], stats))


class Engine:
    def __init__(self, settings: SearchSettings):
        self.settings = settings
        self.pset = make_pset()
        self.group = comparison_group(settings)
        self.rng = random.Random(settings.seed)
        # Seeds may carry constants outside the GP's fixed set (z-pruner's 0.7); they join the primitive
        # set here, before anything else, so a resumed run rebuilds exactly the same set.
        self.seeds = [
            self.individual(tree_to_deap(text, self.pset, add_constants=True))
            for text in settings.seed_formulas
        ]

    @contextmanager
    def _deap_random(self):
        outside = random.getstate()
        random.setstate(self.rng.getstate())
        try:
            yield
        finally:
            self.rng.setstate(random.getstate())
            random.setstate(outside)

    # --- individuals --------------------------------------------------------------------------

    def individual(self, tree: gp.PrimitiveTree) -> Individual:
        expr = deap_to_tree(tree)
        return Individual(tree, format_formula(expr), canonical_key(expr, self.group))

    def from_text(self, text: str) -> Individual:
        """A formula text (a seed or a checkpointed member) as an individual; no code is run."""
        return self.individual(tree_to_deap(text, self.pset))

    def within_limits(self, tree: gp.PrimitiveTree) -> bool:
        return tree.height + 1 <= self.settings.max_depth and len(tree) <= self.settings.max_size

    # --- generations --------------------------------------------------------------------------

    def initial_population(self) -> list[Individual]:
        """Seed formulas first, then ramped half-and-half trees within the depth and size limits, each
        reading the weight, none a canonical duplicate of another; drawing stops with one clear error
        if the limits cannot give that many distinct formulas."""
        s = self.settings
        population: list[Individual] = []
        seen: set[str] = set()
        for seed in self.seeds[: s.population]:
            if seed.canonical not in seen:
                population.append(seed)
                seen.add(seed.canonical)
        # DEAP depths count from 0 at the root; the settings count the root as depth 1.
        grow = partial(gp.genHalfAndHalf, self.pset, s.init_min_depth - 1, s.init_max_depth - 1)
        budget = DRAWS_PER_MEMBER * (s.population - len(population))
        with self._deap_random():
            while len(population) < s.population and budget > 0:
                budget -= 1
                tree = gp.PrimitiveTree(grow())
                if not self.within_limits(tree):
                    continue
                member = self.individual(tree)
                if member.canonical not in seen and reads_weight(member.canonical):
                    population.append(member)
                    seen.add(member.canonical)
        if len(population) < s.population:
            raise UsageError(
                f"found only {len(population)} distinct formulas reading W for --population {s.population} "
                f"within --init-depth {s.init_min_depth}:{s.init_max_depth} and --max-size {s.max_size}; "
                "lower --population or allow deeper or larger trees"
            )
        return population

    def next_generation(self, population: list[Individual], candidates: dict) -> tuple[list, list]:
        """(elites carried over unchanged, offspring made by selection and variation).

        Elites and tournament winners are compared at the highest rung both reached. A child that
        repeats a formula measured before, or does not read the weight, is mutated again (a few times
        at most), so duplicates and constants do not crowd the population out."""
        s = self.settings
        keys = [ind.canonical for ind in population]
        elite_keys = best_unique(keys, candidates, s.elite)
        elites = [population[keys.index(k)] for k in elite_keys]
        winners = tournament(self.rng, keys, candidates, s.population - len(elites), s.tournament)
        children = self._vary([population[i].tree for i in winners])
        # Novel against everything measured so far, not only this population: a formula that died out
        # would cost nothing to measure again but teaches nothing either.
        return elites, self._novel(children, set(keys) | set(candidates))

    def _novel(self, children: list[gp.PrimitiveTree], seen: set[str]) -> list[Individual]:
        offspring = []
        for tree in children:
            child = self.individual(tree)
            for _ in range(NOVELTY_RETRIES):
                if child.canonical not in seen and reads_weight(child.canonical):
                    break
                with self._deap_random():
                    mutant = self._mutate(gp.PrimitiveTree(child.tree), "subtree")  # the most disruptive
                if self.within_limits(mutant):
                    child = self.individual(mutant)
            seen.add(child.canonical)
            offspring.append(child)
        return offspring

    def _vary(self, parents: list[gp.PrimitiveTree]) -> list[gp.PrimitiveTree]:
        """Crossover on consecutive pairs, then mutation; a child over the limits reverts to its parent."""
        s = self.settings
        children = [gp.PrimitiveTree(p) for p in parents]
        with self._deap_random():
            for i in range(1, len(children), 2):
                if random.random() < s.cx_prob:
                    a, b = gp.PrimitiveTree(children[i - 1]), gp.PrimitiveTree(children[i])
                    gp.cxOnePoint(a, b)
                    children[i - 1] = a if self.within_limits(a) else children[i - 1]
                    children[i] = b if self.within_limits(b) else children[i]
            for i, child in enumerate(children):
                if random.random() < s.mut_prob:
                    mutant = self._mutate(gp.PrimitiveTree(child), random.choice(MUTATIONS))
                    children[i] = mutant if self.within_limits(mutant) else child
        return children

    def _mutate(self, tree: gp.PrimitiveTree, kind: str) -> gp.PrimitiveTree:
        if kind == "subtree":
            grow = partial(gp.genFull, min_=0, max_=SUBTREE_MAX_DEPTH - 1)
            return gp.mutUniform(tree, grow, self.pset)[0]
        if kind == "point":
            return gp.mutNodeReplacement(tree, self.pset)[0]
        return gp.mutShrink(tree)[0]
