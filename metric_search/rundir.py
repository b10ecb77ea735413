"""The run directory: file names, run ids and temps a killed write left (written through
``pruning_core.files``, which a kill never leaves half-done)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from pruning_core.errors import UsageError
from pruning_core.files import TEMP_SUFFIX

CONFIG = "config.json"
CHECKPOINT = "checkpoint.json"
GENERATIONS = "generations.jsonl"
CANDIDATES = "candidates.jsonl"
HALL_OF_FAME = "hall_of_fame.json"
FITNESS_PLOT = "fitness.png"
PARETO_PLOT = "pareto.png"
REPORT = "report.md"
VALIDATION = "validation.md"
VALIDATION_JSON = "validation.json"


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Temp files of writes a kill interrupted; their targets still hold the previous version."""
    for stale in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def new_run_id(model: str, seed: int) -> str:
    """``<UTC time>-<model>-s<seed>``: sortable, readable, safe as a folder name."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.rstrip("/")).name).strip("-.") or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{stem[:40]}-s{seed}"


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / CHECKPOINT).is_file()


def require_run_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as an existing run directory, or one clear line saying why it is not one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a run directory; pass runs/<run-id>")
    if not path.is_dir():
        raise UsageError(f"{flag} {path} does not exist; pass a folder made by `python -m metric_search`")
    if not is_run_dir(path):
        raise UsageError(
            f"{flag} {path} is not a metric_search run (no {CONFIG} and {CHECKPOINT}); pass runs/<run-id>"
        )
    return path


def prepare_new_run_dir(path: Path) -> None:
    """Create a fresh run directory; an existing non-empty one is never overwritten."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(
            f"run directory {path} already exists and is not empty; pass --resume {path} to continue it "
            f"or choose another --run-dir"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"cannot create run directory {path} ({err.strerror}); choose another --run-dir"
        ) from err
