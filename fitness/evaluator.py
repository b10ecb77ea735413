"""One candidate metric = score every linear with it, mask in place from a kept dense copy, measure,
restore bit-identical. A bad candidate gets fitness +inf and a reason code, never an exception."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from fitness.stats_cache import StatsCache
from pruning_core.data import load_rows, tokenize_corpus
from pruning_core.gradients import prunable_linears
from pruning_core.masks import keep_mask
from pruning_core.perplexity import make_windows, perplexity
from pruning_core.scorers.base import SparsitySpec

REASONS = ("nonfinite", "constant", "error", "timeout")
FIDELITIES = ("proxy", "ppl")
PROXY_ROWS = 32  # rows per linear sampled for the reconstruction proxy


@dataclass(frozen=True)
class FitnessConfig:
    spec: SparsitySpec = SparsitySpec(0.5)
    data: str = "wikitext2-valid"
    windows: int = 4
    seqlen: int = 256
    timeout_s: float = 600.0


class CandidateFailed(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def _result(fitness: float, reason: str | None, fidelity: str, seconds: float, detail: str = "") -> dict:
    return {"fitness": fitness, "reason": reason, "fidelity": fidelity, "seconds": seconds, "detail": detail}


class Evaluator:
    """Owns the model, a dense copy of its prunable weights, the statistics and the fitness windows."""

    def __init__(self, model, tokenizer, stats: StatsCache, config: FitnessConfig, data_dir=None):
        self.model, self.stats, self.config = model, stats, config
        self.linears = prunable_linears(model)
        self.dense = {name: linear.weight.detach().clone() for name, linear in self.linears.items()}
        tokens = tokenize_corpus(tokenizer, load_rows(config.data, data_dir))
        self.windows = make_windows(tokens, config.seqlen, config.windows)
        generator = torch.Generator().manual_seed(0)
        self.proxy_rows = {
            name: torch.randperm(w.shape[0], generator=generator)[:PROXY_ROWS].to(w.device)
            for name, w in self.dense.items()
        }

    def restore(self) -> None:
        with torch.no_grad():
            for name, linear in self.linears.items():
                linear.weight.copy_(self.dense[name])

    def _apply(self, scorer, deadline: float, with_proxy: bool) -> float | None:
        """Mask every linear in place; with ``with_proxy`` return the mean relative reconstruction error
        (the proxy), else None (the perplexity fidelity does not pay for it)."""
        spec = self.config.spec
        errors = []
        for name, linear in self.linears.items():
            if time.monotonic() > deadline:
                raise CandidateFailed("timeout", f"exceeded {self.config.timeout_s} s")
            dense = self.dense[name]
            stats = self.stats.linear_stats(name)
            scores = scorer.score(dense.float(), stats)
            if scores.shape != dense.shape:
                raise CandidateFailed("error", f"scores shape {tuple(scores.shape)} != {tuple(dense.shape)}")
            groups = scores.reshape(-1, spec.m) if spec.is_nm else scores
            groups = groups.reshape(1, -1) if spec.group == "matrix" and not spec.is_nm else groups
            # one pass gives both checks: NaN and +-inf reach a group's max or min
            low, high = torch.aminmax(groups, dim=1)
            if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
                raise CandidateFailed("nonfinite", name)
            if bool((low == high).all()):
                raise CandidateFailed("constant", name)
            keep = keep_mask(scores, spec)
            torch.mul(dense, keep, out=linear.weight)
            if with_proxy:
                errors.append(self._reconstruction_error(name, dense, keep, stats["hessian"]))
        return sum(errors) / len(errors) if with_proxy else None

    def _reconstruction_error(self, name, dense, keep, hessian) -> float:
        """||dW X||^2 / ||W X||^2 on sampled rows, from the Hessian (no forward pass)."""
        rows = self.proxy_rows[name]
        w = dense[rows].float()
        removed = w * (~keep[rows])
        err = (removed @ hessian * removed).sum()
        base = (w @ hessian * w).sum().clamp_min(1e-20)
        return float(err / base)

    @torch.no_grad()
    def evaluate(self, scorer, fidelity: str = "ppl") -> dict:
        """Fitness of ``scorer`` (lower is better): proxy error or perplexity; never raises."""
        if fidelity not in FIDELITIES:
            raise ValueError(f"fidelity must be one of {FIDELITIES}")
        start = time.monotonic()
        try:
            fitness = self._apply(scorer, start + self.config.timeout_s, with_proxy=fidelity == "proxy")
            if fidelity == "ppl":
                fitness = perplexity(self.model, self.windows, progress=False)["ppl"]
            if not math.isfinite(fitness):
                raise CandidateFailed("nonfinite", "perplexity overflowed")
            return _result(fitness, None, fidelity, time.monotonic() - start)
        except CandidateFailed as failed:
            return _result(math.inf, failed.reason, fidelity, time.monotonic() - start, str(failed))
        except Exception as err:  # any crash of a candidate's code is that candidate's fault
            return _result(
                math.inf, "error", fidelity, time.monotonic() - start, f"{type(err).__name__}: {err}"
            )
        finally:
            self.restore()

    def evaluate_text(self, formula: str, fidelity: str = "ppl") -> dict:
        from primitives.scorer import FormulaScorer

        try:
            scorer = FormulaScorer(formula, group=self.config.spec.group)
        except Exception as err:
            return _result(math.inf, "error", fidelity, 0.0, f"{type(err).__name__}: {err}")
        return self.evaluate(scorer, fidelity)
