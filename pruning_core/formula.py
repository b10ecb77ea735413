"""Formula scorers come from a formula language registered under an entry-point group, so the core
never imports the packages built on top of it (primitives provides the default language)."""

from __future__ import annotations

from importlib.metadata import entry_points

from pruning_core.errors import UsageError

FORMULA_GROUP = "pruning_core.formula_language"


def formula_scorer(text: str, group: str | None = None):
    """A Scorer for formula ``text`` (e.g. ``abs(W) * X``) from the installed formula language."""
    languages = {ep.name: ep for ep in entry_points(group=FORMULA_GROUP)}
    if not languages:
        raise UsageError("--formula needs a formula language; install the metric-search package (primitives)")
    language = languages.get("default") or next(iter(languages.values()))
    return language.load()(text, group=group)
