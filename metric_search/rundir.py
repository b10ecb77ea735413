"""The run directory: file names, run ids, and writes that a kill can never leave half-done
(temp file in the same folder, fsync, os.replace, fsync of the folder)."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from pruning_core.errors import UsageError

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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open folders; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def drop_torn_tail(path: str | os.PathLike) -> None:
    """A kill during an append can leave a last line without its newline; cut it so the next append
    starts a fresh line (the memo skips such a line, but would glue the next record onto it)."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Temp files of writes a kill interrupted; their targets still hold the previous version."""
    for stale in Path(folder).glob(".*.tmp"):
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
