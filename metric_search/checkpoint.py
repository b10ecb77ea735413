"""The search state after a generation, as JSON only: formulas as text (re-read through the formula
grammar on load), fitness numbers, and the state of the engine's ``random.Random`` as lists of ints.
No pickle, no eval: a checkpoint from someone else is data, and a damaged one is one clear error."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fitness.evaluator import FIDELITIES, REASONS
from metric_search.rundir import CHECKPOINT
from pruning_core.errors import UsageError
from pruning_core.files import atomic_write_json

FORMAT = "metric-search-checkpoint"
VERSION = 2  # 2: the top rung, per-setting values, the final check
_MT_WORDS = 625  # Mersenne Twister: 624 state words + the position
TUNING_PARENT = "tuning_parent"  # in a tuning variant's entry: the formula it is one constant step from


@dataclass
class SearchState:
    """Everything the next generation depends on; the memo on disk is only a cache."""

    generation: int = -1  # last completed generation; -1 before the initial population is scored
    rng: tuple | None = None
    population: list[tuple[str, str]] = field(default_factory=list)  # (formula text, canonical key)
    candidates: dict[str, dict] = field(default_factory=dict)  # canonical -> formula, size, fidelities
    hall_of_fame: list[str] = field(default_factory=list)  # canonical keys, best first
    history: list[dict] = field(default_factory=list)  # one summary per completed generation
    baselines: dict[str, dict] = field(default_factory=dict)  # name -> formula, canonical, fidelities
    final: dict | None = None  # the final check against Wanda (metric_search.final), once done
    waiting: list[str] = field(default_factory=list)  # canonical keys held for the next top-rung batch


def rng_to_json(state: tuple) -> list:
    version, words, gauss = state
    return [version, list(words), gauss]


def rng_from_json(data) -> tuple:
    ok = (
        isinstance(data, list)
        and len(data) == 3
        and isinstance(data[0], int)
        and isinstance(data[1], list)
        and len(data[1]) == _MT_WORDS
        and all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 2**32 for w in data[1])
        and data[1][-1] <= 624
        and (data[2] is None or isinstance(data[2], float))
    )
    if not ok:
        raise ValueError("rng state is not a Mersenne Twister state")
    return data[0], tuple(data[1]), data[2]


def encode_result(result: dict | None) -> dict | None:
    """A fitness result as JSON: +inf (a failed candidate) becomes null next to its reason."""
    if result is None:
        return None
    fitness = result["fitness"]
    encoded = {
        "fitness": fitness if math.isfinite(fitness) else None,
        "reason": result.get("reason"),
        "seconds": round(float(result.get("seconds", 0.0)), 4),
    }
    if result.get("values"):
        encoded["values"] = dict(result["values"])
    return encoded


def decode_result(data) -> dict | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("a result is not an object")
    fitness, reason = data.get("fitness"), data.get("reason")
    if fitness is None:
        if reason not in REASONS:
            raise ValueError(f"a failed result has reason {reason!r}")
        fitness = math.inf
    elif not isinstance(fitness, (int, float)) or isinstance(fitness, bool) or not math.isfinite(fitness):
        raise ValueError("a fitness is not a finite number")
    seconds = data.get("seconds", 0.0)
    if not isinstance(seconds, (int, float)):
        raise ValueError("seconds is not a number")
    values = data.get("values")
    if values is not None and not (
        isinstance(values, dict)
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values.values()
        )
    ):
        raise ValueError("per-setting values are not finite numbers")
    decoded = {
        "fitness": float(fitness),
        "reason": reason if fitness == math.inf else None,
        "seconds": seconds,
    }
    if values:
        decoded["values"] = {str(k): float(v) for k, v in values.items()}
    return decoded


def _encode_entry(entry: dict) -> dict:
    out = {k: v for k, v in entry.items() if k not in FIDELITIES}
    for fidelity in FIDELITIES:
        out[fidelity] = encode_result(entry.get(fidelity))
    return out


def _decode_entry(data, check_formula) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("formula"), str):
        raise ValueError("a candidate lacks its formula text")
    check_formula(data["formula"])
    entry = {k: v for k, v in data.items() if k not in FIDELITIES}
    for key in ("size", "generation"):
        if key in entry and (not isinstance(entry[key], int) or isinstance(entry[key], bool)):
            raise ValueError(f"a candidate's {key} is not an integer")
    for fidelity in FIDELITIES:
        entry[fidelity] = decode_result(data.get(fidelity))
    return entry


def state_to_json(state: SearchState) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "generation": state.generation,
        "rng": rng_to_json(state.rng),
        "population": [{"formula": f, "canonical": c} for f, c in state.population],
        "candidates": {key: _encode_entry(entry) for key, entry in state.candidates.items()},
        "hall_of_fame": list(state.hall_of_fame),
        "history": state.history,
        "baselines": {name: _encode_entry(entry) for name, entry in state.baselines.items()},
        "final": state.final,
        "waiting": list(state.waiting),
    }


def state_from_json(data, check_formula) -> SearchState:
    """Rebuild the state; ``check_formula(text)`` runs every formula through the grammar."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"format is not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r} is not {VERSION}")
    generation = data.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < -1:
        raise ValueError("generation is not an integer >= -1")
    population = []
    for item in data.get("population", []):
        if not (isinstance(item, dict) and isinstance(item.get("formula"), str)):
            raise ValueError("a population member lacks its formula text")
        if not isinstance(item.get("canonical"), str):
            raise ValueError("a population member lacks its canonical form")
        check_formula(item["formula"])
        population.append((item["formula"], item["canonical"]))
    candidates = data.get("candidates", {})
    baselines = data.get("baselines", {})
    hall = data.get("hall_of_fame", [])
    history = data.get("history", [])
    if not (isinstance(candidates, dict) and isinstance(baselines, dict)):
        raise ValueError("candidates or baselines is not an object")
    if not (isinstance(hall, list) and all(isinstance(k, str) and k in candidates for k in hall)):
        raise ValueError("the hall of fame names unknown candidates")
    if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise ValueError("history is not a list of objects")
    if any(canonical not in candidates for _, canonical in population):
        raise ValueError("a population member has no result")
    parents = [entry.get(TUNING_PARENT) for entry in candidates.values() if isinstance(entry, dict)]
    if not all(parent is None or (isinstance(parent, str) and parent in candidates) for parent in parents):
        raise ValueError("a tuning variant names an unknown parent")
    waiting = data.get("waiting", [])  # absent from checkpoints written before the top rung's batches
    if not (isinstance(waiting, list) and all(isinstance(k, str) and k in candidates for k in waiting)):
        raise ValueError("the waiting list names unknown candidates")
    final = data.get("final")
    if final is not None:
        if not isinstance(final, dict) or not isinstance(final.get("rows", []), list):
            raise ValueError("final is not an object with rows")
        for row in final.get("rows", []):
            if not isinstance(row, dict) or not isinstance(row.get("formula"), str):
                raise ValueError("a final row lacks its formula text")
            check_formula(row["formula"])
    return SearchState(
        generation=generation,
        rng=rng_from_json(data.get("rng")),
        population=population,
        candidates={str(k): _decode_entry(v, check_formula) for k, v in candidates.items()},
        hall_of_fame=list(hall),
        history=history,
        baselines={str(k): _decode_entry(v, check_formula) for k, v in baselines.items()},
        final=final,
        waiting=list(waiting),
    )


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")  # NaN / Infinity: never written by a checkpoint


def save_checkpoint(run_dir: Path, state: SearchState) -> None:
    atomic_write_json(Path(run_dir) / CHECKPOINT, state_to_json(state))


def load_checkpoint(run_dir: Path, check_formula) -> SearchState:
    path = Path(run_dir) / CHECKPOINT
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
        return state_from_json(data, check_formula)
    except UsageError as err:
        raise UsageError(f"{path} holds a formula the grammar rejects ({err}); start a new run") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as err:
        raise UsageError(f"{path} is not a valid checkpoint ({err}); start a new run") from err
