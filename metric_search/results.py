"""Reading a run back (config.json + checkpoint.json, both validated) and the result files derived
from its state: hall_of_fame.json and generations.jsonl."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fitness.evaluator import FIDELITIES
from metric_search import rundir
from metric_search.checkpoint import SearchState, encode_result, load_checkpoint
from metric_search.config import CONFIG_VERSION, SearchSettings, settings_from_dict
from primitives import parse_formula
from pruning_core import files
from pruning_core.errors import UsageError


@dataclass
class Run:
    path: Path
    config: dict
    settings: SearchSettings
    state: SearchState


def load_run(path, flag: str = "RUN_DIR") -> Run:
    """A run directory's config and state, or one line saying what is wrong with it."""
    path = rundir.require_run_dir(path, flag)
    config_path = path / rundir.CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict) or not isinstance(config.get("run_id"), str):
            raise ValueError("no run_id")
        if config.get("version") != CONFIG_VERSION:
            raise ValueError(
                f"config version {config.get('version')!r}, this metric_search reads {CONFIG_VERSION}"
            )
        settings_data = config["settings"]
        if not isinstance(settings_data, dict):
            raise ValueError("settings is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, ValueError) as err:
        raise UsageError(
            f"{config_path} is not a valid metric_search config ({err}); start a new run"
        ) from err
    settings = settings_from_dict(settings_data, str(config_path))
    return Run(path, config, settings, load_checkpoint(path, parse_formula))


def hall_of_fame_entries(state: SearchState) -> list[dict]:
    """The hall of fame as plain rows, best first (no timings: identical for identical runs)."""
    entries = []
    for rank, key in enumerate(state.hall_of_fame, start=1):
        entry = state.candidates[key]
        reached = [f for f in FIDELITIES if entry.get(f)]
        entries.append(
            {
                "rank": rank,
                "formula": entry["formula"],
                "size": entry.get("size"),
                "generation": entry.get("generation"),
                **{f: entry[f]["fitness"] if entry.get(f) else None for f in FIDELITIES},
                "rung": reached[-1] if reached else None,
                "values": entry[reached[-1]].get("values") if reached else None,
            }
        )
    return entries


def baseline_entries(state: SearchState) -> dict:
    """wanda, magnitude, pruner-zero on the run's fitness data; a failed fidelity is null + reason."""
    return {
        name: {
            "formula": entry["formula"],
            "canonical": entry["canonical"],
            **{f: encode_result(entry.get(f))["fitness"] if entry.get(f) else None for f in FIDELITIES},
            **{f"{f}_reason": entry[f]["reason"] for f in FIDELITIES if entry.get(f)},
            **{f"{f}_values": entry[f].get("values") for f in FIDELITIES if entry.get(f)},
        }
        for name, entry in state.baselines.items()
    }


def write_progress_files(run_dir: Path, config: dict, state: SearchState) -> None:
    """hall_of_fame.json and generations.jsonl, rewritten whole (atomically) from the state."""
    files.atomic_write_json(
        run_dir / rundir.HALL_OF_FAME,
        {
            "run_id": config["run_id"],
            "model": config["settings"]["evaluator"]["model"],
            "seed": config["settings"]["seed"],
            "generation": state.generation,
            "entries": hall_of_fame_entries(state),
            "baselines": baseline_entries(state),
            "final": state.final,
        },
    )
    lines = "".join(json.dumps(h, sort_keys=True, allow_nan=False) + "\n" for h in state.history)
    files.atomic_write_text(run_dir / rundir.GENERATIONS, lines)
