"""Built-in scorers, registered on import, and the lookup the CLI uses."""

from pruning_core.scorers import apt, simple, sparsegpt, zpruner  # noqa: F401  (register on import)
from pruning_core.scorers.base import SparsitySpec, get_scorer, register, registered

__all__ = ["SparsitySpec", "get_scorer", "register", "registered", "resolve_scorer"]


def resolve_scorer(name: str | None = None, formula: str | None = None, group: str | None = None):
    """The scorer named ``name`` (built-in or plugin), or one compiled from ``formula`` text."""
    from pruning_core.errors import UsageError

    if (name is None) == (formula is None):
        raise UsageError("pass exactly one of --scorer NAME or --formula TEXT")
    if formula is not None:
        from pruning_core.formula import formula_scorer

        return formula_scorer(formula, group=group)
    from pruning_core.plugins import load_plugins

    load_plugins()
    return get_scorer(name)
