"""The packages depend one way: pruning_core <- primitives <- fitness <- metric_search (docs/architecture.md).
Every import in every product module counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("pruning_core", "primitives", "fitness", "metric_search")  # each may import those before it


def imported_packages(source: str) -> set[str]:
    """Top-level names of every absolute import in ``source``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_imported_packages_sees_imports_inside_functions():
    source = "import os.path\nfrom fitness.memo import Memo\ndef f():\n    import metric_search.cli\n    from . import x\n"
    assert imported_packages(source) == {"os", "fitness", "metric_search"}


def test_every_package_imports_only_the_layers_below_it():
    offenders = []
    for rank, package in enumerate(LAYERS):
        forbidden = set(LAYERS[rank + 1 :])
        for path in sorted((REPO / package).rglob("*.py")):
            wrong = imported_packages(path.read_text()) & forbidden
            offenders += [f"{path.relative_to(REPO)} imports {name}" for name in sorted(wrong)]
    assert offenders == []
