"""Save a pruned model in Hugging Face format plus a pruning.json record, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pruning_core.files import atomic_dir


def save_pruned(model, tokenizer, directory: str | os.PathLike, record: dict) -> Path:
    """Write safetensors + config + tokenizer + pruning.json to ``directory`` via a staging dir."""
    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        from pruning_core.errors import UsageError

        raise UsageError(f"--save {target} exists and is not empty; pass a new directory")
    with atomic_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "pruning.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    return target
