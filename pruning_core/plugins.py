"""Scorer plugins: JSON data files (formula text + metadata), never code.

A plugin is compiled by the formula language's whitelist grammar and registered like a built-in.
Found in: ``--plugins DIR``, ``$METRIC_SEARCH_PLUGINS`` (os.pathsep-separated), the user data dir
(``$XDG_DATA_HOME/metric-search/plugins``), and packages exposing the entry-point group
``pruning_core.plugins`` (an object that is a plugin dict or a list of them).
"""

from __future__ import annotations

import json
import os
import re
from importlib.metadata import entry_points
from pathlib import Path

from pruning_core.errors import UsageError
from pruning_core.scorers.base import registered
from pruning_core.spec import GROUPS
from pruning_core.updates import UPDATE_CHOICES, WithUpdate, stats_with_update

PLUGIN_FORMAT = "metric-search-scorer"
PLUGIN_VERSION = 1
PLUGIN_ENTRY_POINTS = "pruning_core.plugins"
MAX_PLUGIN_BYTES = 64 * 1024
_REQUIRED = {"format": str, "version": int, "name": str, "formula": str, "stats": list, "group": str}
_OPTIONAL = {"provenance": dict, "description": str, "update": str}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

_extra_dirs: list[Path] = []


def user_plugin_dir() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "metric-search" / "plugins"


def add_plugin_dir(path: str | os.PathLike) -> None:
    """Search ``path`` too (the ``--plugins DIR`` flag)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(
            f"--plugins {path} is not a directory; pass the folder that holds plugin .json files"
        )
    _extra_dirs.append(path)


def plugin_dirs() -> list[Path]:
    env = [Path(p) for p in os.environ.get("METRIC_SEARCH_PLUGINS", "").split(os.pathsep) if p]
    return [*_extra_dirs, *env, user_plugin_dir()]


def checked_plugin(data, origin: str) -> dict:
    """Check a parsed plugin against the schema: exact keys, types, version, a safe name."""
    if not isinstance(data, dict):
        raise UsageError(f"plugin {origin} is not a JSON object; re-export it with `metric_search export`")
    unknown = set(data) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise UsageError(
            f"plugin {origin} has unexpected fields {sorted(unknown)}; only data fields are allowed"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise UsageError(
                f"plugin {origin} lacks a valid {key!r} field; re-export it with `metric_search export`"
            )
    for key, kind in _OPTIONAL.items():
        if key in data and not isinstance(data[key], kind):
            raise UsageError(f"plugin {origin}: field {key!r} must be a {kind.__name__}")
    if data["format"] != PLUGIN_FORMAT or data["version"] != PLUGIN_VERSION:
        raise UsageError(
            f"plugin {origin} is format {data['format']!r} version {data['version']}, expected "
            f"{PLUGIN_FORMAT!r} version {PLUGIN_VERSION}; re-export it with this metric-search"
        )
    if not _NAME.match(data["name"]):
        raise UsageError(
            f"plugin {origin} has an invalid name {data['name']!r}; use lowercase letters, digits, -_."
        )
    if data["group"] not in GROUPS:
        raise UsageError(f"plugin {origin} has group {data['group']!r}; use 'row' or 'matrix'")
    if data.get("update", "none") not in UPDATE_CHOICES:
        raise UsageError(
            f"plugin {origin} has update {data['update']!r}; use one of: {', '.join(UPDATE_CHOICES)}"
        )
    return data


def read_plugin_file(path: Path) -> dict:
    if path.stat().st_size > MAX_PLUGIN_BYTES:
        raise UsageError(f"plugin {path} is larger than {MAX_PLUGIN_BYTES} bytes; it is not a scorer plugin")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"plugin {path} is not valid JSON ({err.__class__.__name__}); re-export it") from err
    return checked_plugin(data, str(path))


class PluginScorer:
    """A registered formula scorer that remembers where it came from; with an ``update`` it is a
    solver (the formula's mask, then that weight update)."""

    def __init__(self, data: dict, origin: str):
        from pruning_core.formula import formula_scorer

        try:
            self._formula = formula_scorer(data["formula"], group=data["group"])
        except UsageError as err:
            raise UsageError(f"plugin {origin}: {err}") from err
        self.name = data["name"]
        self.formula = data["formula"]
        self.update = data.get("update", "none")
        self.stats = stats_with_update(self._formula.stats, self.update)
        if data["stats"] != list(self.stats):  # the file must say exactly what the formula reads
            raise UsageError(
                f"plugin {origin} lists stats {data['stats']!r} but its formula reads {list(self.stats)}; "
                "re-export it with `metric_search export`"
            )
        self.default_group = data["group"]
        self.reference = f"plugin {origin}: {data['formula']}"
        self.provenance = data.get("provenance", {})

    def score(self, weight, stats):
        return self._formula.score(weight, stats)


class UpdatingPluginScorer(PluginScorer):
    def prune(self, weight, stats, spec):
        return WithUpdate(scorer=self._formula, update=self.update).prune(weight, stats, spec)


def _discovered() -> list[tuple[dict, str]]:
    found = []
    for directory in plugin_dirs():
        if directory.is_dir():
            found += [(read_plugin_file(p), str(p)) for p in sorted(directory.glob("*.json"))]
    for ep in entry_points(group=PLUGIN_ENTRY_POINTS):
        payload = ep.load()
        for item in payload if isinstance(payload, list) else [payload]:
            found.append((checked_plugin(item, f"entry point {ep.name}"), f"entry point {ep.name}"))
    return found


def load_plugins() -> list[str]:
    """Register every discovered plugin not registered yet; return the names registered now."""
    from pruning_core.scorers.base import register

    names = []
    existing = registered()
    for data, origin in _discovered():
        if data["name"] in existing:
            if getattr(existing[data["name"]], "formula", None) == data["formula"]:
                continue
            raise UsageError(
                f"plugin {origin} is named {data['name']!r}, which is already a scorer; rename it"
            )
        kind = PluginScorer if data.get("update", "none") == "none" else UpdatingPluginScorer
        scorer = kind(data, origin)
        register(scorer)
        existing[scorer.name] = scorer
        names.append(scorer.name)
    return names
