"""One candidate metric = score every linear with it, mask in place, measure, restore bit-identical
(from a snapshot of the dense weights, see fitness.snapshot). A bad candidate gets fitness +inf and a
reason code, never an exception.

Fidelities form a ladder, cheapest first: ``proxy`` (layer reconstruction error from the cached
Hessians; the model is never masked), ``ppl`` (perplexity on ``windows`` fitness windows) and
``top`` (perplexity on ``top_windows``, a superset; see fitness.windows for which windows). With
several sparsity settings the fitness is the geometric mean over them, so ranking by it is ranking by the mean of log(value / a
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
from pathlib import Path

import torch

from fitness.snapshot import snapshot
from fitness.stacks import LinearStack, gather_rows, stack_linears
from fitness.stats_cache import StatsCache
from pruning_core.blocks import prunable_linears
from pruning_core.data import calibration_windows
from pruning_core.masks import keep_mask
from pruning_core.perplexity import perplexity
from pruning_core.pruning import Calibration
from pruning_core.scorers.base import SparsitySpec
from pruning_core.scorers.sparsegpt import inverse_hessian_factor, live_weight, obs_fixed_mask
from pruning_core.updates import adaptive_obs, span_statistics

REASONS = ("nonfinite", "constant", "error", "timeout", "oom", "lost")
# Failures of the machine, not of the formula: never kept as a formula's result (a resume retries them).
TRANSIENT = ("timeout", "oom", "lost")
TOP_RUNGS = ("one-shot", "sequential", "one-pass")
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
    # "sequential": the top rung prunes as a user does, with the core's sequential driver on
    # ``calibration`` (each block's statistics from the blocks pruned before it); "one-shot": every
    # linear from the dense model's cached statistics, as the lower rungs; "one-pass": the sequential
    # driver at one pass per block (each linear pruned as its input arrives; ~half the calibration cost)
    top_rung: str = "one-shot"
    calibration: Calibration | None = None  # the statistics' calibration (needed by a sequential rung)
    batch_size: int = 1  # fitness windows per forward pass (a GPU runs a small model's batch at once)
    window_order: str = "spread"  # which corpus windows the rungs read (see fitness.windows)


@dataclass(frozen=True)
class FitnessInputs:
    """The token ids an evaluator reads: the windows of its perplexity rungs, and the calibration corpus
    a sequential top rung prunes from (None for a one-shot top rung)."""

    windows: torch.Tensor
    calib_tokens: torch.Tensor | None = None


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
    """Owns the model, its prunable linears stacked by shape (the weights, statistics, sampled rows;
    see ``fitness.stacks``), a snapshot of their dense values and the fitness windows."""

    def __init__(self, model, stats: StatsCache, config: FitnessConfig, inputs: FitnessInputs,
                 scratch: Path | None = None):  # fmt: skip
        """``scratch``: a directory on disk for the CPU's dense-weight snapshot file (None: in memory)."""
        self.model, self.stats, self.config = model, stats, config
        self.windows = inputs.windows
        self.calib_windows = None
        if config.top_rung != "one-shot":
            c = config.calibration
            if c is None or inputs.calib_tokens is None:
                raise ValueError(f"a {config.top_rung} top rung needs the calibration and its tokens")
            self.calib_windows = calibration_windows(inputs.calib_tokens, c.nsamples, c.seqlen, c.seed)
        self.linears = prunable_linears(model)
        # for a sequential top rung: G of the cached statistics, the dense model's gradients on these very
        # calibration windows (what prune's calibrate_and_prune computes, or reads from its cache)
        self.gradients = stats.of_every_linear("G")
        generator = torch.Generator().manual_seed(0)
        self.proxy_rows = {
            name: torch.randperm(linear.weight.shape[0], generator=generator)[:PROXY_ROWS].to(
                linear.weight.device
            )
            for name, linear in self.linears.items()
        }
        self.stacks = stack_linears(self.linears, stats, self.proxy_rows)
        self.snapshot = snapshot(self._weights(), scratch)
        self._pruned = False  # whether the weights differ from the snapshot
        # built on first use, then reused by every candidate (see _proxy_stacks, _factor_stacks, _weight_stacks)
        self._proxy_stacked = self._factors = self._stacked = None
        self._span_cache: dict = {}

    @property
    def group(self) -> str:
        return comparison_group(self.config.specs)

    def windows_for(self, fidelity: str) -> torch.Tensor:
        return self.windows[: self.config.top_windows if fidelity == "top" else self.config.windows]

    def restore(self) -> None:
        if self._pruned:
            with torch.no_grad():
                self.snapshot.restore(self._weights())
            self._pruned = False

    def _weights(self) -> list[torch.Tensor]:
        return [weight for stack in self.stacks for weight in stack.weights]

    def _scores(self, scorer, stack: LinearStack, deadline: float, sampled: bool = False) -> torch.Tensor:
        """Scores (S, out, in) of a stack, or (S, r, in) of its sampled rows (elementwise scorers
        only): an elementwise scorer scores the stack in one call, any other linear by linear."""
        self._check_deadline(deadline)
        weights = stack.sampled if sampled else stack.stacked()
        if getattr(scorer, "elementwise", False):
            stats = (stack.sampled_stats if sampled else stack.stats)(self.stats, scorer.stats)
            scores = scorer.score(weights, stats)
        else:
            scores = torch.empty(weights.shape, dtype=torch.float32, device=weights.device)
            for index, name in enumerate(stack.names):
                one = scorer.score(weights[index], self.stats.linear_stats(name))
                if one.shape != weights[index].shape:
                    raise CandidateFailed(
                        "error", f"scores shape {tuple(one.shape)} != {tuple(weights[index].shape)}"
                    )
                scores[index] = one
        if scores.shape != weights.shape:
            raise CandidateFailed("error", f"scores shape {tuple(scores.shape)} != {tuple(weights.shape)}")
        return scores

    @staticmethod
    def _check(scores: torch.Tensor, spec: SparsitySpec, names: list[str]) -> None:
        """A bad candidate fails here: NaN / inf anywhere, or a linear whose scores are constant over
        every group. One max and one min per group decide both (a NaN propagates into both, an inf
        becomes one of them): elementwise tests over the scores would be passes of their own."""
        stacked = scores.shape[0]
        groups = scores.reshape(stacked, -1, spec.m) if spec.is_nm else scores
        groups = groups.reshape(stacked, 1, -1) if spec.whole_matrix else groups
        high, low = groups.amax(dim=-1), groups.amin(dim=-1)
        finite = (torch.isfinite(high) & torch.isfinite(low)).flatten(1).all(dim=1)
        if not bool(finite.all()):
            raise CandidateFailed("nonfinite", names[int((~finite).nonzero()[0])])
        constant = (high == low).flatten(1).all(dim=1)
        if bool(constant.any()):
            raise CandidateFailed("constant", names[int(constant.nonzero()[0])])

    def _proxy(self, scorer, deadline: float) -> list[float]:
        """Mean relative reconstruction error over the linears, per setting; nothing is masked. Row and
        N:M masks of the sampled rows need only those rows' scores, which an elementwise scorer computes
        alone; a matrix mask (or a matrix-wide formula) needs whole matrices. The checks read the scores
        computed."""
        specs = self.config.specs
        elementwise = getattr(scorer, "elementwise", False)
        keeps: list[list[torch.Tensor]] = [[] for _ in specs]
        for stack in self.stacks:
            full = None
            if not elementwise or any(spec.whole_matrix for spec in specs):
                full = self._scores(scorer, stack, deadline)
            sampled = self._scores(scorer, stack, deadline, sampled=True) if elementwise else None
            rows = None if elementwise else gather_rows(full, stack.rows)
            for per_spec, spec in zip(keeps, specs):
                self._check(sampled if elementwise and not spec.whole_matrix else full, spec, stack.names)
                if self.config.update == "adaptive":
                    continue  # chosen inside the update (_proxy_error)
                if spec.whole_matrix:
                    per_spec.append(gather_rows(keep_mask(full, spec), stack.rows))
                else:
                    per_spec.append(keep_mask(sampled if elementwise else rows, spec))
        return [self._proxy_error(keep, scorer, spec, deadline) for keep, spec in zip(keeps, specs)]

    def _proxy_error(self, keeps: list[torch.Tensor], scorer, spec: SparsitySpec, deadline: float) -> float:
        """Mean over linears of ||dW X||^2 / ||W X||^2 on the sampled rows, from the Hessians (no forward
        pass); dW removes the pruned weights, then (with an update) moves the kept ones."""
        errors = []
        for index, (stack, (rows, bases)) in enumerate(zip(self.stacks, self._proxy_stacks())):
            self._check_deadline(deadline)
            keep = keeps[index] if keeps else None
            changes = self._updated(index, rows, keep, scorer, spec, proxy=True) - rows
            for name, change, base in zip(stack.names, changes, bases):
                errors.append(float((change @ self.stats.stat(name, "hessian") * change).sum() / base))
        return sum(errors) / len(errors)

    def _updated(self, index: int, weights: torch.Tensor, keep: torch.Tensor | None, scorer,
                 spec: SparsitySpec, proxy: bool = False) -> torch.Tensor:  # fmt: skip
        """Weights (S, out, in) of stack ``index`` after pruning with the run's update: masked by
        ``keep`` (none), updated under it (obs), or masked and updated span by span by the scorer
        (adaptive; ``proxy``: the weights are the sampled rows)."""
        if self.config.update == "adaptive":
            span_stats = [self._span_stats(name, proxy) for name in self.stacks[index].names]
            factors = self._factor_stacks()[index]
            return adaptive_obs(
                scorer, weights, factors, span_stats, spec, self._candidate_check, UPDATE_BLOCK
            )
        if self.config.update == "obs":
            return obs_fixed_mask(weights, self._factor_stacks()[index], ~keep, UPDATE_BLOCK)
        return weights * keep

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
            shape = tuple(self.linears[name].weight.shape)
            if proxy:
                rows = self.proxy_rows[name]
                stats = {k: v[rows] if tuple(v.shape) == shape else v for k, v in stats.items()}
                shape = (len(rows), shape[1])
            self._span_cache[key] = span_statistics(stats, shape)
        return self._span_cache[key]

    def _proxy_stacks(self) -> list[tuple[torch.Tensor, list[float]]]:
        """Per stack, built once: the sampled rows (dead inputs zeroed) stacked, and each linear's
        ||W X||^2 on them (the proxy's denominators do not depend on the candidate)."""
        if self._proxy_stacked is None:
            self._proxy_stacked = []
            for stack in self.stacks:
                hessians = [self.stats.stat(n, "hessian") for n in stack.names]
                rows = torch.stack([live_weight(w, h) for w, h in zip(stack.sampled, hessians)])
                bases = [float((w @ h * w).sum().clamp_min(1e-20)) for w, h in zip(rows, hessians)]
                self._proxy_stacked.append((rows, bases))
        return self._proxy_stacked

    def _factor_stacks(self) -> list[torch.Tensor]:
        """Per stack, the upper Cholesky factors of the damped inverse Hessians, stacked once (they
        depend on the Hessians only; q/k/v share one Hessian and so one factor computation)."""
        if self._factors is None:
            computed: dict[str, torch.Tensor] = {}
            self._factors = []
            for stack in self.stacks:
                for name in stack.names:
                    key = self.stats.hessian_of[name]
                    if key not in computed:
                        computed[key] = inverse_hessian_factor(self.stats.stat(name, "hessian").float())
                self._factors.append(torch.stack([computed[self.stats.hessian_of[n]] for n in stack.names]))
        return self._factors

    def _weight_stacks(self) -> list[torch.Tensor]:
        """Per stack, the dense weights with dead inputs zeroed, once, for the obs update (first called
        before any weight is written)."""
        if self._stacked is None:
            self._stacked = [
                torch.stack(
                    [live_weight(w, self.stats.stat(n, "hessian")) for n, w in zip(s.names, s.weights)]
                )
                for s in self.stacks
            ]
        return self._stacked

    def _prune(self, scorer, spec: SparsitySpec, deadline: float, check: bool) -> None:
        """Every linear = its dense weight pruned for ``spec``: masked by its keep-mask, or (with an
        update) updated under it / with the masks the scorer chooses inside the update. Stack by stack,
        so no mask of the whole model is held. ``check`` (the first setting): the scores are checked for
        every setting, so a bad candidate fails before any forward pass or update."""
        adaptive = self.config.update == "adaptive"
        self.restore()
        keeps: list[torch.Tensor | None] = []
        for stack in self.stacks:
            if adaptive and not check:  # the update chooses the masks; scores are only checked
                keeps.append(None)
                continue
            scores = self._scores(scorer, stack, deadline)
            for checked in self.config.specs if check else ():
                self._check(scores, checked, stack.names)
            keep = None if adaptive else keep_mask(scores, spec)
            if self.config.update == "none":
                self._pruned = True
                for weight, mask in zip(stack.weights, keep):
                    weight.mul_(mask)
            else:
                keeps.append(keep)
        weight_stacks = self._weight_stacks() if keeps else []
        for index, (stack, keep) in enumerate(zip(self.stacks, keeps)):  # updates only
            self._check_deadline(deadline)
            self._pruned = True
            for weight, updated in zip(
                stack.weights, self._updated(index, weight_stacks[index], keep, scorer, spec)
            ):
                weight.copy_(updated)

    def _prune_sequentially(self, scorer, spec: SparsitySpec, deadline: float) -> None:
        """The core's sequential driver on the dense model, with the run's update; the scorer checks
        the deadline at every linear (and every span of an adaptive update)."""
        from pruning_core.sequential import Walk, prune_model
        from pruning_core.updates import with_update

        self.restore()
        self._pruned = True
        c = self.config.calibration
        walk = Walk(
            True, c.batch_size, c.offload, progress=False, one_pass=self.config.top_rung == "one-pass"
        )
        prune_model(
            self.model, with_update(_Deadlined(scorer, self._check_deadline, deadline), self.config.update),
            spec, self.calib_windows, gradients=self.gradients, walk=walk,
        )  # fmt: skip

    def _measure(self, scorer, fidelity: str, deadline: float) -> dict[str, float]:
        """Setting label -> proxy error or perplexity."""
        specs = self.config.specs
        if fidelity == "proxy":
            return dict(zip((spec.describe() for spec in specs), self._proxy(scorer, deadline)))
        sequential = fidelity == "top" and self.config.top_rung != "one-shot"
        values = {}
        for position, spec in enumerate(specs):
            if sequential:
                self._prune_sequentially(scorer, spec, deadline)
            else:
                self._prune(scorer, spec, deadline, check=position == 0)
            windows = self.windows_for(fidelity)
            ppl = perplexity(self.model, windows, self.config.batch_size, progress=False)["ppl"]
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


class _Deadlined:
    """A scorer that checks the candidate's deadline before every call (the sequential driver has no
    deadline of its own)."""

    def __init__(self, scorer, check, deadline: float):
        self.scorer, self.check, self.deadline = scorer, check, deadline
        self.name, self.stats = scorer.name, scorer.stats
        self.default_group = scorer.default_group
        self.reference = getattr(scorer, "reference", "")

    def score(self, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check(self.deadline)
        return self.scorer.score(weight, stats)
