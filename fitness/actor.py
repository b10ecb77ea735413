"""A Ray actor that owns one Evaluator (model + statistics loaded once) and scores formula texts."""

from __future__ import annotations

from fitness.setup import EvaluatorSettings, build_evaluator


class EvaluatorActor:
    """Plain class; ``metric_search.dispatch`` wraps it with ray.remote and the right resources."""

    def __init__(self, settings: dict, threads: int = 1):
        import torch

        torch.set_num_threads(threads)  # a fixed thread count per actor keeps CPU actors from contending
        self.evaluator = build_evaluator(EvaluatorSettings(**settings))

    def evaluate(self, formula: str, fidelity: str = "ppl") -> dict:
        return self.evaluator.evaluate_text(formula, fidelity)
