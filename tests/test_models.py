"""Model loading from every source: local HF dir, .gguf file, the embedded default name."""

from __future__ import annotations

import pytest
import torch

from pruning_core.errors import UsageError
from pruning_core.models import embedded_gguf_path, load_model


def test_local_directory_loads_with_dtype_and_device(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir("qwen2")), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training and tokenizer("hello").input_ids


def test_missing_and_unknown_models_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(str(tmp_path / "nothing.gguf"))
    with pytest.raises(UsageError, match="neither an embedded name"):
        load_model("smollm9-1b")
    with pytest.raises(UsageError, match="not a model directory"):
        load_model(str(tmp_path))


def test_corrupt_and_truncated_gguf_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(UsageError, match="not a GGUF"):
        load_model(str(bad), cache=tmp_path / "cache")
    truncated = tmp_path / "truncated.gguf"
    with open(embedded_gguf_path("smollm2-135m"), "rb") as fh:
        truncated.write_bytes(fh.read(5_000_000))
    with pytest.raises(UsageError, match="corrupt or truncated"):
        load_model(str(truncated), cache=tmp_path / "cache")


@pytest.mark.real_model
def test_embedded_name_and_gguf_path_load_the_same_model():
    by_name, tokenizer = load_model("smollm2-135m")
    by_path, _ = load_model(str(embedded_gguf_path("smollm2-135m")))
    assert by_name.config.model_type == "llama" and by_name.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(by_name(ids).logits, by_path(ids).logits)
