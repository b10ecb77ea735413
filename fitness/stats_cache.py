"""Every terminal a formula may use (X, G, H, and the Hessian for U and the proxy), computed once from
the dense model per (model, calibration) key and persisted as safetensors with a sha256 checksum, so
runs and processes (Ray actors) share them. A damaged file is detected, discarded and recomputed.

On the CPU only the per-column statistics (X, H) are held in memory: G and the Hessians, as large as the
model's linears together, are read from the cache file when a candidate needs them (pread: they stay in
the page cache, shared by every evaluator on the machine, not in each one's memory; a read of all
Hessians costs ~0.05 s). On a GPU, or when shipped, every statistic is held on the device."""

from __future__ import annotations

import json
from collections.abc import Mapping
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
STAT_KEYS = ("X", "H", "G", "hessian")
HELD = ("X", "H")  # per input column: small, held in memory everywhere


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


class _Lookup(Mapping):
    """A read-only mapping over fixed keys whose values are fetched on each read."""

    def __init__(self, keys: tuple[str, ...], fetch):
        self._keys, self._fetch = keys, fetch

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._fetch(key)

    def __contains__(self, key) -> bool:  # without fetching
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def file_tensors(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of a verified safetensors file: the ``HELD`` statistics read once, any other read
    from the file on each access (a fresh tensor; the open file survives the file's replacement)."""
    from safetensors import safe_open

    file = safe_open(path, framework="pt", backend="pread")
    keys = tuple(file.keys())
    held = {k: file.get_tensor(k) for k in keys if k.rsplit("/", 1)[-1] in HELD}
    return _Lookup(keys, lambda key: held[key] if key in held else file.get_tensor(key))


class StatsCache:
    """The terminals of every prunable linear: ``tensors`` maps 'linear/X' (H, G) and 'linear/hessian'
    (only the first of the linears sharing an input) to tensors, held or read from the cache file."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], hessian_of: dict[str, str]):
        self.tensors, self.hessian_of = tensors, hessian_of

    def stat(self, name: str, key: str) -> torch.Tensor:
        """One statistic of one linear (a per-weight one may be read from the file on every call)."""
        return self.tensors[f"{self.hessian_of[name]}/hessian" if key == "hessian" else f"{name}/{key}"]

    def linear_stats(self, name: str) -> Mapping[str, torch.Tensor]:
        """A linear's statistics by key, each fetched when a scorer reads it."""
        return _Lookup(STAT_KEYS, lambda key: self.stat(name, key))

    def of_every_linear(self, key: str) -> Mapping[str, torch.Tensor]:
        """One statistic by linear name, each fetched when read (e.g. G for the sequential driver)."""
        return _Lookup(tuple(self.hessian_of), lambda name: self.stat(name, key))

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
        hessian_of = cls._verified(data_path, meta_path, ident)
        if hessian_of is None:
            tensors, hessian_of = compute_stats(model, tokenizer, key, data_dir, cache_root, progress)
            with atomic_path(data_path) as tmp:
                save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
                meta = {"ident": ident, "sha256": file_sha256(tmp), "hessian_of": hessian_of}
                atomic_write_json(meta_path, meta)  # checksum first: a data file without it is unused
            if device.type != "cpu":
                return cls(tensors, hessian_of)
            del tensors  # served from the file just written, as a later load would
        if device.type == "cpu":
            return cls(file_tensors(data_path), hessian_of)
        return cls({k: v.to(device) for k, v in load_file(data_path).items()}, hessian_of)

    @staticmethod
    def _verified(data_path: Path, meta_path: Path, ident: dict) -> dict[str, str] | None:
        """The cached file's ``hessian_of`` if the file exists and matches its recorded checksum, else
        None (and the damaged files are gone)."""
        if not (data_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("ident") != ident or file_sha256(data_path) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            return dict(meta["hessian_of"])
        except Exception:  # truncated, corrupted or foreign: recompute rather than trust it
            data_path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            return None
