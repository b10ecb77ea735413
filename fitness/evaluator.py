"""One candidate metric = score every linear with it, mask from a kept dense copy, measure, restore
bit-identical. A bad candidate gets fitness +inf and a reason code, never an exception.

Fidelities form a ladder, cheapest first: ``proxy`` (layer reconstruction error from the cached
Hessians; the model is never masked), ``ppl`` (perplexity on the first ``windows`` fitness windows)
and ``top`` (perplexity on the first ``top_windows``, a superset). With several sparsity settings the
fitness is the geometric mean over them, so ranking by it is ranking by the mean of log(value / a
baseline's value) over the settings, whatever the baseline.

With ``update="obs"`` a candidate is its mask followed by SparseGPT's OBS update for that mask; with
``update="adaptive"`` the candidate re-chooses each span's mask inside that update, on the weights as
updated so far (``pruning_core.updates.adaptive_obs``, exactly what ``prune --update adaptive`` does).
The proxy measures the updated sampled rows (adaptive: chosen on those rows alone), the perplexity
rungs the updated model. Linears of one shape are stacked so the column loop runs once per shape."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from fitness.stats_cache import StatsCache
from pruning_core.blocks import prunable_linears
from pruning_core.data import load_rows, tokenize_corpus
from pruning_core.masks import keep_mask
from pruning_core.perplexity import make_windows, perplexity
from pruning_core.scorers.base import SparsitySpec
from pruning_core.scorers.sparsegpt import inverse_hessian_factor, live_weight, obs_fixed_mask
from pruning_core.updates import adaptive_obs, span_statistics

REASONS = ("nonfinite", "constant", "error", "timeout", "oom", "lost")
# Failures of the machine, not of the formula: never kept as a formula's result (a resume retries them).
TRANSIENT = ("timeout", "oom", "lost")
FIDELITIES = ("proxy", "ppl", "top")  # the ladder, cheapest first
PROXY_ROWS = 32  # rows per linear sampled for the reconstruction proxy
PROXY_FLOOR = 1e-20  # a zero error would make the geometric mean -inf
# Columns per lazy block of the obs update: the same result for any size; small blocks trade the
# elementwise in-block work (which dominates on stacked layers) for fast matrix products.
UPDATE_BLOCK = 32


def comparison_group(specs) -> str:
    """One group whose rank-equivalence holds for every setting: an order over a whole matrix is also
    the order within each row (and N:M group), not the other way round."""
    return "matrix" if any(s.whole_matrix for s in specs) else "row"


@dataclass(frozen=True)
class FitnessConfig:
    specs: tuple[SparsitySpec, ...] = (SparsitySpec(0.5),)
    data: str = "wikitext2-valid"
    windows: int = 4
    seqlen: int = 256
    timeout_s: float = 600.0
    top_windows: int = 16
    update: str = "none"  # "none", "obs" or "adaptive": the weight update with each candidate's mask


class CandidateFailed(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def _result(fitness: float, reason: str | None, fidelity: str, seconds: float, detail: str = "",
            values: dict | None = None) -> dict:  # fmt: skip
    result = {
        "fitness": fitness,
        "reason": reason,
        "fidelity": fidelity,
        "seconds": seconds,
        "detail": detail,
    }
    if values is not None:
        result["values"] = values
    return result


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(max(v, PROXY_FLOOR)) for v in values) / len(values))


class Evaluator:
    """Owns the model, a dense copy of its prunable weights, the statistics and the fitness windows."""

    def __init__(self, model, tokenizer, stats: StatsCache, config: FitnessConfig, data_dir=None):
        self.model, self.stats, self.config = model, stats, config
        self.linears = prunable_linears(model)
        self.dense = {name: linear.weight.detach().clone() for name, linear in self.linears.items()}
        tokens = tokenize_corpus(tokenizer, load_rows(config.data, data_dir))
        self.windows = make_windows(tokens, config.seqlen, max(config.windows, config.top_windows))
        # built on first use, then reused by every candidate (see _proxy_stacks, _factor_stacks, _weight_stacks)
        self._proxy_stacked = self._factors = self._stacked = None
        self._span_cache: dict = {}
        generator = torch.Generator().manual_seed(0)
        self.proxy_rows = {
            name: torch.randperm(w.shape[0], generator=generator)[:PROXY_ROWS].to(w.device)
            for name, w in self.dense.items()
        }

    @property
    def group(self) -> str:
        return comparison_group(self.config.specs)

    def windows_for(self, fidelity: str) -> torch.Tensor:
        return self.windows[: self.config.top_windows if fidelity == "top" else self.config.windows]

    def restore(self) -> None:
        with torch.no_grad():
            for name, linear in self.linears.items():
                linear.weight.copy_(self.dense[name])

    def _scores(self, scorer, name: str, deadline: float):
        self._check_deadline(deadline)
        dense = self.dense[name]
        stats = self.stats.linear_stats(name)
        scores = scorer.score(dense.float(), stats)
        if scores.shape != dense.shape:
            raise CandidateFailed("error", f"scores shape {tuple(scores.shape)} != {tuple(dense.shape)}")
        return dense, stats, scores

    @staticmethod
    def _check(scores: torch.Tensor, spec: SparsitySpec, name: str) -> None:
        """A bad candidate fails here: NaN / inf anywhere, or scores constant over every group (each
        group's entries all equal its first one: elementwise, cheaper than a min / max per group)."""
        if not bool(torch.isfinite(scores).all()):
            raise CandidateFailed("nonfinite", name)
        groups = scores.reshape(-1, spec.m) if spec.is_nm else scores
        groups = groups.reshape(1, -1) if spec.whole_matrix else groups
        if bool((groups == groups[:, :1]).all()):
            raise CandidateFailed("constant", name)

    def _keep(self, scores: torch.Tensor, spec: SparsitySpec, name: str) -> torch.Tensor:
        self._check(scores, spec, name)
        return keep_mask(scores, spec)

    def _proxy(self, scorer, deadline: float) -> list[float]:
        """Mean relative reconstruction error over the linears, per setting; nothing is masked. Row and
        N:M masks of the sampled rows need only those rows' scores; a matrix mask needs them all."""
        specs = self.config.specs
        keeps: list[dict[str, torch.Tensor]] = [{} for _ in specs]
        for name in self.linears:
            _, _, scores = self._scores(scorer, name, deadline)
            rows = self.proxy_rows[name]
            for per_spec, spec in zip(keeps, specs):
                self._check(scores, spec, name)
                if self.config.update == "adaptive":
                    continue  # chosen inside the update (_proxy_error)
                if spec.whole_matrix:
                    per_spec[name] = keep_mask(scores, spec)[rows]
                else:
                    per_spec[name] = keep_mask(scores[rows], spec)
        return [self._proxy_error(keep, scorer, spec, deadline) for keep, spec in zip(keeps, specs)]

    def _proxy_error(self, keep_rows: dict[str, torch.Tensor], scorer, spec: SparsitySpec,
                     deadline: float) -> float:  # fmt: skip
        """Mean over linears of ||dW X||^2 / ||W X||^2 on the sampled rows, from the Hessians (no forward
        pass); dW removes the pruned weights, then (with an update) moves the kept ones."""
        errors = []
        for group, (names, hessians, rows, bases) in enumerate(self._proxy_stacks()):
            self._check_deadline(deadline)
            changes = self._updated(group, names, rows, keep_rows, scorer, spec, proxy=True) - rows
            for hessian, change, base in zip(hessians, changes, bases):
                errors.append(float((change @ hessian * change).sum() / base))
        return sum(errors) / len(errors)

    def _updated(self, group: int, names: list[str], weights: torch.Tensor, keep: dict, scorer,
                 spec: SparsitySpec, proxy: bool = False) -> torch.Tensor:  # fmt: skip
        """Stacked weights of shape group ``group`` after pruning with the run's update: masked by
        ``keep`` (none), updated under it (obs), or masked and updated span by span by the scorer
        (adaptive; ``proxy``: the weights are the sampled rows)."""
        if self.config.update == "adaptive":
            span_stats = [self._span_stats(name, proxy) for name in names]
            factors = self._factor_stacks()[group]
            return adaptive_obs(
                scorer, weights, factors, span_stats, spec, self._candidate_check, UPDATE_BLOCK
            )
        pruned = ~torch.stack([keep[name] for name in names])
        if self.config.update == "obs":
            return obs_fixed_mask(weights, self._factor_stacks()[group], pruned, UPDATE_BLOCK)
        return weights.masked_fill(pruned, 0.0)

    def _check_deadline(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise CandidateFailed("timeout", f"exceeded {self.config.timeout_s} s")

    @staticmethod
    def _candidate_check(scores: torch.Tensor, weight: torch.Tensor) -> None:
        """Scores of one span inside the adaptive update: a bad candidate fails, never raises else."""
        if scores.shape != weight.shape:
            raise CandidateFailed("error", f"scores shape {tuple(scores.shape)} != {tuple(weight.shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise CandidateFailed("nonfinite", "inside the adaptive update")

    def _span_stats(self, name: str, proxy: bool = False):
        """Column-sliced statistics of a linear for the adaptive update (proxy: its sampled rows')."""
        key = (name, proxy)
        if key not in self._span_cache:
            stats = self.stats.linear_stats(name)
            shape = tuple(self.dense[name].shape)
            if proxy:
                rows = self.proxy_rows[name]
                stats = {k: v[rows] if tuple(v.shape) == shape else v for k, v in stats.items()}
                shape = (len(rows), shape[1])
            self._span_cache[key] = span_statistics(stats, shape)
        return self._span_cache[key]

    def _shape_groups(self) -> list[list[str]]:
        """Linear names grouped by weight shape: stacked, a group runs the obs column loop once."""
        by_shape: dict[tuple, list[str]] = {}
        for name, weight in self.dense.items():
            by_shape.setdefault(tuple(weight.shape), []).append(name)
        return list(by_shape.values())

    def _proxy_stacks(self) -> list[tuple[list[str], list[torch.Tensor], torch.Tensor, list[float]]]:
        """Per shape group, built once: names, Hessians, the sampled rows (dead inputs zeroed) stacked,
        and each linear's ||W X||^2 on them (the proxy's denominators do not depend on the candidate)."""
        if self._proxy_stacked is None:
            self._proxy_stacked = []
            for names in self._shape_groups():
                hessians = [self.stats.linear_stats(n)["hessian"] for n in names]
                rows = torch.stack(
                    [live_weight(self.dense[n][self.proxy_rows[n]], h) for n, h in zip(names, hessians)]
                )
                bases = [float((w @ h * w).sum().clamp_min(1e-20)) for w, h in zip(rows, hessians)]
                self._proxy_stacked.append((names, hessians, rows, bases))
        return self._proxy_stacked

    def _factor_stacks(self) -> list[torch.Tensor]:
        """Per shape group, the upper Cholesky factors of the damped inverse Hessians, stacked once (they
        depend on the Hessians only; q/k/v share one Hessian and so one factor computation)."""
        if self._factors is None:
            computed: dict[str, torch.Tensor] = {}
            self._factors = []
            for names in self._shape_groups():
                for name in names:
                    key = self.stats.hessian_of[name]
                    if key not in computed:
                        computed[key] = inverse_hessian_factor(
                            self.stats.linear_stats(name)["hessian"].float()
                        )
                self._factors.append(torch.stack([computed[self.stats.hessian_of[n]] for n in names]))
        return self._factors

    def _weight_stacks(self) -> list[torch.Tensor]:
        """Per shape group, the dense weights (dead inputs zeroed) stacked once, for the obs update."""
        if self._stacked is None:
            self._stacked = [
                torch.stack(
                    [live_weight(self.dense[n], self.stats.linear_stats(n)["hessian"]) for n in names]
                )
                for names in self._shape_groups()
            ]
        return self._stacked

    def _apply_update(self, keep: dict[str, torch.Tensor], scorer, spec: SparsitySpec,
                      deadline: float) -> None:  # fmt: skip
        """Every linear = its dense weight updated under its keep-mask (obs), or with the masks the
        scorer chooses inside the update (adaptive)."""
        for group, (names, weights) in enumerate(zip(self._shape_groups(), self._weight_stacks())):
            self._check_deadline(deadline)
            for name, weight in zip(names, self._updated(group, names, weights, keep, scorer, spec)):
                self.linears[name].weight.copy_(weight)

    def _masks(self, scorer, deadline: float) -> list[dict[str, torch.Tensor]]:
        """Per setting, every linear's keep-mask: each linear is scored once for all settings (one byte
        per weight and setting is cheaper than scoring again), and a bad candidate fails before any
        forward pass."""
        specs = self.config.specs
        masks: list[dict[str, torch.Tensor]] = [{} for _ in specs]
        for name in self.linears:
            _, _, scores = self._scores(scorer, name, deadline)
            for per_spec, spec in zip(masks, specs):
                if self.config.update == "adaptive":
                    self._check(scores, spec, name)  # its masks are chosen inside the update
                else:
                    per_spec[name] = self._keep(scores, spec, name)
        return masks

    def _measure(self, scorer, fidelity: str, deadline: float) -> dict[str, float]:
        """Setting label -> proxy error or perplexity."""
        specs = self.config.specs
        if fidelity == "proxy":
            return dict(zip((spec.describe() for spec in specs), self._proxy(scorer, deadline)))
        values = {}
        for spec, keep in zip(specs, self._masks(scorer, deadline)):
            if self.config.update == "none":
                for name, linear in self.linears.items():
                    torch.mul(self.dense[name], keep[name], out=linear.weight)
            else:
                self._apply_update(keep, scorer, spec, deadline)
            ppl = perplexity(self.model, self.windows_for(fidelity), progress=False)["ppl"]
            if not math.isfinite(ppl):
                raise CandidateFailed("nonfinite", f"perplexity overflowed at {spec.describe()}")
            values[spec.describe()] = ppl
        return values

    @torch.no_grad()
    def evaluate(self, scorer, fidelity: str = "ppl") -> dict:
        """Fitness of ``scorer`` (lower is better) at a rung of the ladder; never raises."""
        if fidelity not in FIDELITIES:
            raise ValueError(f"fidelity must be one of {FIDELITIES}")
        start = time.monotonic()
        try:
            values = self._measure(scorer, fidelity, start + self.config.timeout_s)
            fitness = geometric_mean(values.values())
            return _result(fitness, None, fidelity, time.monotonic() - start, values=values)
        except CandidateFailed as failed:
            return _result(math.inf, failed.reason, fidelity, time.monotonic() - start, str(failed))
        except (torch.OutOfMemoryError, MemoryError) as err:
            return _result(
                math.inf, "oom", fidelity, time.monotonic() - start, f"{type(err).__name__}: {err}"
            )
        except Exception as err:  # any crash of a candidate's code is that candidate's fault
            return _result(
                math.inf, "error", fidelity, time.monotonic() - start, f"{type(err).__name__}: {err}"
            )
        finally:
            self.restore()

    def evaluate_text(self, formula: str, fidelity: str = "ppl") -> dict:
        from primitives.scorer import FormulaScorer

        try:
            scorer = FormulaScorer(formula, group=self.group)
        except Exception as err:
            return _result(math.inf, "error", fidelity, 0.0, f"{type(err).__name__}: {err}")
        return self.evaluate(scorer, fidelity)
