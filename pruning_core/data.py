"""Text corpora by name, read through `datasets` from the local data dir (or the hub), and the seeded
calibration sampler."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pruning_core.errors import UsageError

DATA_DIR_ENV = "METRIC_SEARCH_DATA_DIR"


@dataclass(frozen=True)
class Corpus:
    local_file: str  # relative to the data dir
    builder: str  # datasets builder for the local file
    hub: tuple  # load_dataset args for users with network
    split: str
    is_wikitext: bool


CORPORA = {
    "wikitext2-test": Corpus(
        "wikitext-2-raw/wiki.test.raw", "text", ("wikitext", "wikitext-2-raw-v1"), "test", True
    ),
    "wikitext2-valid": Corpus(
        "wikitext-2-raw/wiki.valid.raw", "text", ("wikitext", "wikitext-2-raw-v1"), "validation", True
    ),
    "c4": Corpus(
        "c4/c4_train_shard0_first1000.jsonl",
        "json",
        ("allenai/c4", "en"),
        "train",
        False,
    ),
}


def default_data_dir() -> Path:
    """$METRIC_SEARCH_DATA_DIR, else ../shared/data relative to the project root."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def local_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where corpus ``name`` is read from when it is on disk (``data_dir``, else the default data dir)."""
    return (Path(data_dir) if data_dir else default_data_dir()) / CORPORA[name].local_file


def load_rows(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Rows of a corpus: WikiText-2 exactly as the HF ``wikitext-2-raw-v1`` loader gives them, C4 texts."""
    if name not in CORPORA:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(CORPORA)}")
    import datasets

    datasets.disable_progress_bars()
    corpus = CORPORA[name]
    local = local_file(name, data_dir)
    if local.is_file():
        # keep_linebreaks: the HF wikitext rows end with "\n"; blank lines become "".
        kwargs = {"keep_linebreaks": True} if corpus.builder == "text" else {}
        table = datasets.load_dataset(corpus.builder, data_files=str(local), split="train", **kwargs)
    elif data_dir is not None or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UsageError(f"{local} not found; pass --data-dir DIR (or set {DATA_DIR_ENV}) to the data folder")
    else:
        try:
            table = datasets.load_dataset(*corpus.hub, split=corpus.split)
        except Exception as err:  # network and hub errors come in many types
            raise UsageError(
                f"{local} not found and the hub copy failed ({type(err).__name__}); pass --data-dir DIR"
            ) from err
    rows = table["text"]
    if corpus.is_wikitext:
        rows = [row if row.strip() else "" for row in rows]
    return list(rows)


def tokenize_corpus(tokenizer, rows: list[str]) -> torch.Tensor:
    """Rows joined with "\\n\\n" and tokenized once (the SparseGPT/Wanda protocol): a 1-D LongTensor."""
    ids = tokenizer("\n\n".join(rows), return_tensors="pt", verbose=False).input_ids
    return ids[0]


# Token ids by (tokenizer, corpus file), remembered for this process and, with a cache root, on disk:
# a search's driver, each of its actors, the final check and the test suite tokenize the same corpora
# many times, each time seconds for WikiText-2.
_CORPUS_TOKENS: dict[str, torch.Tensor] = {}


def _corpus_key(tokenizer, name: str, data_dir) -> dict | None:
    """What the token ids depend on: the tokenizer's whole definition and the local file's identity
    (None, nothing remembered: a slow tokenizer, or a hub copy that is not pinned to a file)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    local = local_file(name, data_dir)
    if backend is None or not local.is_file():
        return None
    stat = local.stat()
    return {
        "tokenizer": type(tokenizer).__name__,
        "definition": hashlib.sha256(backend.to_str().encode()).hexdigest(),
        "python_side": [getattr(tokenizer, a, None) for a in ("add_bos_token", "add_eos_token")],
        "file": [str(local.resolve()), stat.st_size, stat.st_mtime_ns],
    }


def corpus_tokens(
    tokenizer, name: str, data_dir: str | os.PathLike | None = None, cache_root=None
) -> torch.Tensor:
    """``tokenize_corpus(tokenizer, load_rows(name, data_dir))`` (a copy), remembered for this process
    and, when ``cache_root`` is given, in its ``tokens/`` folder."""
    from pruning_core.files import key_digest

    key = _corpus_key(tokenizer, name, data_dir) if name in CORPORA else None
    if key is None:
        return tokenize_corpus(tokenizer, load_rows(name, data_dir))
    digest = key_digest(key)
    if digest not in _CORPUS_TOKENS:
        path = Path(cache_root) / "tokens" / f"{digest}.safetensors" if cache_root else None
        ids = _stored_tokens(path) if path else None
        if ids is None:
            ids = tokenize_corpus(tokenizer, load_rows(name, data_dir))
            if path:
                _store_tokens(path, ids)
        _CORPUS_TOKENS[digest] = ids
    return _CORPUS_TOKENS[digest].clone()


def _stored_tokens(path: Path) -> torch.Tensor | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(path)["ids"]
    except Exception:  # damaged or truncated: tokenized again and rewritten
        return None


def _store_tokens(path: Path, ids: torch.Tensor) -> None:
    """Best effort: the copy only saves time, so a read-only or full cache folder is no error."""
    from safetensors.torch import save_file

    from pruning_core.files import atomic_path

    try:
        with atomic_path(path) as tmp:
            save_file({"ids": ids.contiguous()}, str(tmp))
    except OSError:
        pass


def calibration_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets of the concatenated documents.

    Concatenation (not "a document longer than seqlen") because the C4 sample has few long documents.
    """
    if nsamples < 1:
        raise UsageError(f"--nsamples must be >= 1, got {nsamples}")
    if token_ids.numel() <= seqlen:
        raise UsageError(f"calibration text has {token_ids.numel()} tokens, fewer than --seqlen {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])
