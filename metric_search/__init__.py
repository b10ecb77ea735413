"""Discover pruning metrics by genetic programming: DEAP evolution of formulas, evaluated by a pool of
fitness actors on Ray, with checkpoints, reports, validation on WikiText-2 test and plugin export.

Entry point: ``python -m metric_search`` (see ``metric_search.cli``).
"""
