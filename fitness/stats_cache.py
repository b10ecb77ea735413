"""Every terminal a formula may use (X, G, H, and the Hessian for U and the proxy), computed once from
the dense model per (model, calibration) key and persisted as safetensors with a sha256 checksum, so
runs and processes (Ray actors) share them. A damaged file is detected, discarded and recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pruning_core.blocks import model_fingerprint
from pruning_core.data import calibration_windows, corpus_tokens
from pruning_core.files import atomic_path, atomic_write_json, file_sha256, key_digest
from pruning_core.gradients import gradient_magnitudes
from pruning_core.linalg import inverse_hessian_diag
from pruning_core.pruning import Calibration
from pruning_core.sequential import Walk, walk_blocks

FORMAT_VERSION = 1


def compute_stats(model, tokenizer, key: Calibration, data_dir=None, cache_root=None, progress=True):
    """Per prunable linear: X (in,), H = [H^-1]_jj (in,), G (out, in); Hessians shared by linears that
    read the same input (q/k/v, gate/up), referenced by name. Returns (tensors, hessian_of)."""
    tokens = corpus_tokens(tokenizer, key.data, data_dir, cache_root)
    windows = calibration_windows(tokens, key.nsamples, key.seqlen, key.seed)
    gradients = gradient_magnitudes(model, windows, key.key(), cache_root, progress)
    tensors: dict[str, torch.Tensor] = {}
    hessian_of: dict[str, str] = {}

    def keep(visit) -> None:
        seen: dict[bytes, str] = {}
        for name, stats in visit.stats.items():
            full = f"{visit.name}.{name}"
            tensors[f"{full}/X"] = stats["X"]
            tensors[f"{full}/H"] = inverse_hessian_diag(stats["hessian"])
            tensors[f"{full}/G"] = gradients[full]
            # linears fed by the same tensor have bit-identical statistics: store their Hessian once
            fingerprint = stats["X"].cpu().numpy().tobytes()
            if fingerprint not in seen:
                seen[fingerprint] = full
                tensors[f"{full}/hessian"] = stats["hessian"]
            hessian_of[full] = seen[fingerprint]

    walk_blocks(
        model, windows, ("X", "hessian"), keep, Walk(sequential=False, progress=progress), desc="stats"
    )
    return tensors, hessian_of


class StatsCache:
    """The terminals of every prunable linear, on the evaluation device."""

    def __init__(self, tensors: dict[str, torch.Tensor], hessian_of: dict[str, str]):
        self.tensors, self.hessian_of = tensors, hessian_of

    def linear_stats(self, name: str) -> dict[str, torch.Tensor]:
        t = self.tensors
        return {
            "X": t[f"{name}/X"],
            "H": t[f"{name}/H"],
            "G": t[f"{name}/G"],
            "hessian": t[f"{self.hessian_of[name]}/hessian"],
        }

    @classmethod
    def load_or_compute(
        cls, model, tokenizer, key: Calibration, cache_root: Path, data_dir=None, progress: bool = True
    ) -> StatsCache:
        from safetensors.torch import load_file, save_file

        ident = {"version": FORMAT_VERSION, "model": model_fingerprint(model), **key.key()}
        name = key_digest(ident)
        folder = Path(cache_root) / "stats"
        data_path, meta_path = folder / f"{name}.safetensors", folder / f"{name}.json"
        device = next(model.parameters()).device
        loaded = cls._load_verified(data_path, meta_path, ident, load_file)
        if loaded is not None:
            tensors, hessian_of = loaded
            return cls({k: v.to(device) for k, v in tensors.items()}, hessian_of)
        tensors, hessian_of = compute_stats(model, tokenizer, key, data_dir, cache_root, progress)
        with atomic_path(data_path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
            meta = {"ident": ident, "sha256": file_sha256(tmp), "hessian_of": hessian_of}
            atomic_write_json(meta_path, meta)  # checksum first: a data file without it is unused
        return cls(tensors, hessian_of)

    @staticmethod
    def _load_verified(data_path: Path, meta_path: Path, ident: dict, load_file):
        """The cached tensors if the file exists and matches its recorded checksum, else None."""
        if not (data_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("ident") != ident or file_sha256(data_path) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            return load_file(data_path), meta["hessian_of"]
        except Exception:  # truncated, corrupted or foreign: recompute rather than trust it
            data_path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            return None
