"""Results keyed by (canonical form, fidelity): in memory, and appended to a JSONL file in the run
directory, so an equivalent candidate is never evaluated twice, even across a resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pruning_core.files import drop_torn_tail


def _encode(value):
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def _decode(record: dict) -> dict:
    if record.get("fitness") == "inf":
        record["fitness"] = math.inf
    return record


class Memo:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.results: dict[tuple[str, str], dict] = {}
        if self.path and self.path.is_file():
            drop_torn_tail(self.path)  # a kill mid-append: the next append starts a fresh line
            for line in self.path.read_text().splitlines():
                try:
                    record = _decode(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a damaged line is skipped, the rest is kept
                self.results[(record["canonical"], record["fidelity"])] = record

    def get(self, canonical: str, fidelity: str) -> dict | None:
        return self.results.get((canonical, fidelity))

    def put(self, canonical: str, fidelity: str, result: dict) -> dict:
        record = dict(result, canonical=canonical, fidelity=fidelity)
        self.results[(canonical, fidelity)] = record
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({k: _encode(v) for k, v in record.items()}) + "\n")
        return record

    def __len__(self) -> int:
        return len(self.results)
