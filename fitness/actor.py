"""A Ray actor that owns one Evaluator (model + statistics loaded once) and scores formula texts."""

from __future__ import annotations

from fitness.setup import EvaluatorSettings, Shipment, build_evaluator


class EvaluatorActor:
    """Plain class; ``metric_search.dispatch`` wraps it with ray.remote and the right resources."""

    def __init__(self, settings: dict, threads: int = 1, shipment: Shipment | None = None):
        """``shipment``: what the driver prepared (Ray resolves its object reference to this actor's own
        copy, whose model the evaluator takes over); None: read this node's files."""
        import torch

        torch.set_num_threads(threads)  # a fixed thread count per actor keeps CPU actors from contending
        self.evaluator = build_evaluator(EvaluatorSettings(**settings), shipment=shipment)

    def evaluate(self, formula: str, fidelity: str = "ppl") -> dict:
        return self.evaluator.evaluate_text(formula, fidelity)
