"""Canonical tree -> one torch function ``(weight, stats) -> scores``, cached by canonical key.

The tree becomes a flat schedule of kernel calls over its distinct subtrees (a repeated ``abs(W)`` is
computed once); each call is a vectorized float32 kernel on the weight's device.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from primitives.canonical import canonical_form
from primitives.ops import OPS
from primitives.terminals import stats_needed, terminal_tensor
from primitives.tree import Const, Expr, Term, terminal_names

CACHE_SIZE = 4096


class CompiledFormula:
    """Scores of one canonical formula; call with (weight (out x in), stats dict). An ``elementwise``
    formula also takes a stack (S, out, in) with per-column statistics (S, in) and G (S, out, in)."""

    def __init__(self, key: str, tree: Expr):
        self.key = key
        self.tree = tree
        self.terminals = tuple(sorted(terminal_names(tree)))
        self.stats = stats_needed(self.terminals)
        self._steps: list[tuple] = []
        self._schedule(tree, {})
        # Each score reads only its own weight's entries and its column's statistics: a stack of
        # layers (S, out, in) or a subset of rows scores in one call with the same values.
        self.elementwise = not any(step[0] == "op" and step[1].matrix_wide for step in self._steps)

    def _schedule(self, node: Expr, seen: dict) -> int:
        """Append the steps computing ``node`` (each distinct subtree once); return its slot."""
        if node in seen:
            return seen[node]
        if isinstance(node, Term):
            step = ("terminal", node.name)
        elif isinstance(node, Const):
            step = ("constant", node.value)
        elif node.op == "pow":
            step = ("pow", self._schedule(node.args[0], seen), node.args[1].value)
        else:
            step = ("op", OPS[node.op], tuple(self._schedule(a, seen) for a in node.args))
        self._steps.append(step)
        seen[node] = len(self._steps) - 1
        return seen[node]

    def __call__(self, weight: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        stats = stats or {}
        shape, device = weight.shape, weight.device
        slots: list[torch.Tensor] = []
        inputs = []  # storages of the terminals: the weight's and the statistics' memory
        for step in self._steps:
            kind = step[0]
            if kind == "terminal":
                slots.append(terminal_tensor(step[1], weight, stats))
                inputs.append(slots[-1].untyped_storage().data_ptr())
            elif kind == "constant":
                slots.append(torch.full((), step[1], dtype=torch.float32, device=device))
            elif kind == "pow":
                slots.append(OPS["pow"].kernel(slots[step[1]], step[2]))
            else:
                op, args = step[1], [slots[i] for i in step[2]]
                if op.matrix_wide:
                    args = [a.expand(shape) for a in args]
                slots.append(op.kernel(*args))
        # A fresh tensor: never an alias of the weight or a statistic, always the weight's full shape. A
        # computed result that already is one is returned as it is (a copy costs a pass over the model).
        result = slots[-1]
        fresh = (
            self._steps[-1][0] != "constant"
            and result.shape == shape
            and result.dtype == torch.float32
            and result.is_contiguous()
            and result.untyped_storage().data_ptr() not in inputs
        )
        return result if fresh else torch.empty(shape, dtype=torch.float32, device=device).copy_(result)


_cache: OrderedDict[str, CompiledFormula] = OrderedDict()
_lock = threading.Lock()


def compile_formula(tree_or_text, group: str = "row") -> CompiledFormula:
    """The compiled canonical form of a formula for a comparison group ("row" covers N:M)."""
    key, canonical = canonical_form(tree_or_text, group)
    with _lock:
        compiled = _cache.get(key)
        if compiled is not None:
            _cache.move_to_end(key)
            return compiled
    compiled = CompiledFormula(key, canonical)
    with _lock:
        compiled = _cache.setdefault(key, compiled)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled
