"""Shared fixtures: a tiny trained tokenizer and tiny random decoders of several architectures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("METRIC_SEARCH_DATA_DIR", REPO.parent / "shared" / "data"))
VOCAB = 320

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _wikitext_lines(count: int) -> list[str]:
    with open(DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw", encoding="utf-8") as fh:
        return [line for _, line in zip(range(count), fh)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE trained on a slice of WikiText-2 valid, saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(_wikitext_lines(3000), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def tiny_config(arch: str, layers: int = 2):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(intermediate_size=128, num_key_value_heads=2, sliding_window=None, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common)
    if arch == "opt":
        return tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        )
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "mistral", "gemma2", "opt"]


def make_tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers), dtype=torch.float32)
    # Random init at std 0.02 gives near-uniform logits; larger weights make pruning visible in ppl.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer_dir):
    """Save a tiny random model + tokenizer as a HF model dir; returns a factory by architecture."""
    from transformers import AutoTokenizer

    def build(arch: str = "llama", seed: int = 0) -> Path:
        path = tmp_path / f"tiny-{arch}-{seed}"
        make_tiny_model(arch, seed).save_pretrained(path)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
        return path

    return build


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


# --- end-to-end search ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def search_model(tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny random LLaMA the search tests prune, saved with the tiny tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("search-model") / "tiny-llama"
    make_tiny_model("llama", 0).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def search_cache(tmp_path_factory, search_model) -> Path:
    """Statistics computed once here, so actors and drivers only load them."""
    from search_fixtures import evaluator_settings

    from fitness.setup import build_evaluator

    root = tmp_path_factory.mktemp("search-cache")
    build_evaluator(evaluator_settings(search_model, root))
    return root


@pytest.fixture(scope="module")
def local_ray():
    """The embedded Ray (2 CPUs, loopback) the search tests run on: started once per test process and left
    running for the next module (a start costs several seconds). Tests that make their own Ray end it
    first (test_search_cluster.py); Ray ends it when the process exits."""
    import ray

    from metric_search import cluster

    if not ray.is_initialized():
        cluster.connect(None, num_cpus=2)


@pytest.fixture
def isolated_plugins(tmp_path, monkeypatch):
    """Only the plugin folders a test names are searched, and the scorer registry is restored after."""
    from pruning_core import plugins
    from pruning_core.scorers import base

    monkeypatch.setattr(plugins, "_extra_dirs", [])
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("METRIC_SEARCH_PLUGINS", raising=False)
