"""Foundation: corpora as the HF loader gives them, the calibration sampler, canonical perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pruning_core import perplexity as perplexity_module
from pruning_core.data import calibration_windows, corpus_tokens, load_rows, tokenize_corpus
from pruning_core.perplexity import make_windows, perplexity


def test_wikitext_rows_match_the_hf_loader_layout(data_dir):
    test_rows = load_rows("wikitext2-test", data_dir)
    valid_rows = load_rows("wikitext2-valid", data_dir)
    assert len(test_rows) == 4358
    assert len(valid_rows) == 3760
    # Read the raw file independently: lines keep "\n"; whitespace-only lines become "".
    with open(data_dir / "wikitext-2-raw" / "wiki.test.raw", encoding="utf-8", newline="") as fh:
        expected = [line if line.strip() else "" for line in fh.read().splitlines(keepends=True)]
    assert test_rows == expected
    assert test_rows[1].startswith(" = Robert Boulter = ") and test_rows[1].endswith("\n")


def test_c4_rows_are_the_documents(data_dir):
    import json

    rows = load_rows("c4", data_dir)
    with open(data_dir / "c4" / "c4_train_shard0_first1000.jsonl", encoding="utf-8") as fh:
        expected = [json.loads(line)["text"] for line in fh]
    assert rows == expected


def test_calibration_windows_are_seeded_slices_of_the_stream():
    stream = torch.arange(10_000)
    a = calibration_windows(stream, nsamples=6, seqlen=32, seed=3)
    b = calibration_windows(stream, nsamples=6, seqlen=32, seed=3)
    c = calibration_windows(stream, nsamples=6, seqlen=32, seed=4)
    assert a.shape == (6, 32) and torch.equal(a, b) and not torch.equal(a, c)
    # every window is a contiguous slice of the concatenated stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(6, 31, dtype=torch.long))


def test_windows_drop_the_tail():
    ids = torch.arange(1000)
    windows = make_windows(ids, 128)
    assert windows.shape == (7, 128)
    assert torch.equal(windows.flatten(), ids[: 7 * 128])
    assert make_windows(ids, 128, max_windows=3).shape == (3, 128)


# whole windows per cross-entropy call, or slices of 10 positions (63 predicted: the last slice is short)
@pytest.mark.parametrize("slice_logits", [None, 10 * 320])
def test_perplexity_equals_a_direct_cross_entropy_loop(tiny_model_dir, data_dir, monkeypatch, slice_logits):
    if slice_logits:
        monkeypatch.setattr(perplexity_module, "NLL_SLICE_LOGITS", slice_logits)
    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenize_corpus(tokenizer, load_rows("wikitext2-valid", data_dir)[:400])
    windows = make_windows(ids, 64, max_windows=9)
    got = perplexity(model, windows, batch_size=4, progress=False)

    # Independent: one window at a time, log-softmax and gather by hand, summed in float64.
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window.unsqueeze(0)).logits[0].double()
            logp = logits.log_softmax(-1)
            for t in range(window.numel() - 1):
                total -= logp[t, window[t + 1]].item()
                count += 1
    expected = math.exp(total / count)
    assert got["windows"] == 9 and got["tokens"] == 9 * 64
    assert abs(got["ppl"] - expected) / expected < 1e-5


def test_remembered_corpus_tokens_are_the_tokenized_file_and_follow_its_changes(
    tokenizer_dir, data_dir, tmp_path
):
    import shutil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = tmp_path / "data"
    shutil.copytree(data_dir / "wikitext-2-raw", folder / "wikitext-2-raw")
    raw = folder / "wikitext-2-raw" / "wiki.valid.raw"
    # Independent: the file read by hand, joined and tokenized directly.
    with open(raw, encoding="utf-8", newline="") as fh:
        rows = [line if line.strip() else "" for line in fh.read().splitlines(keepends=True)]
    expected = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    first = corpus_tokens(tokenizer, "wikitext2-valid", folder)
    assert torch.equal(first, expected)
    first.zero_()  # callers get a copy: the remembered ids are not theirs to change
    again = corpus_tokens(AutoTokenizer.from_pretrained(tokenizer_dir), "wikitext2-valid", folder)
    assert torch.equal(again, expected)

    raw.write_text(" = A new article = \n", encoding="utf-8")  # an edited file is tokenized again
    edited = corpus_tokens(tokenizer, "wikitext2-valid", folder)
    assert torch.equal(
        edited, tokenizer("\n\n".join([" = A new article = \n"]), return_tensors="pt").input_ids[0]
    )


def test_corpus_tokens_on_disk_are_reused_by_a_new_process_and_a_damaged_file_is_redone(
    tokenizer_dir, data_dir, tmp_path, monkeypatch
):
    from pruning_core import data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = tokenize_corpus(tokenizer, load_rows("wikitext2-valid", data_dir))
    monkeypatch.setattr(data, "_CORPUS_TOKENS", {})
    assert torch.equal(corpus_tokens(tokenizer, "wikitext2-valid", data_dir, tmp_path), expected)
    (stored,) = (tmp_path / "tokens").glob("*.safetensors")

    def no_tokenizing(*_):
        raise AssertionError("tokenized again although the ids are on disk")

    monkeypatch.setattr(data, "_CORPUS_TOKENS", {})  # as a new process sees it
    monkeypatch.setattr(data, "tokenize_corpus", no_tokenizing)
    assert torch.equal(corpus_tokens(tokenizer, "wikitext2-valid", data_dir, tmp_path), expected)

    stored.write_bytes(stored.read_bytes()[:100])  # truncated by a crash outside our atomic write
    monkeypatch.setattr(data, "_CORPUS_TOKENS", {})
    monkeypatch.setattr(data, "tokenize_corpus", tokenize_corpus)
    assert torch.equal(corpus_tokens(tokenizer, "wikitext2-valid", data_dir, tmp_path), expected)
    assert torch.equal(data._stored_tokens(stored), expected)  # rewritten


def test_a_cache_root_that_cannot_be_written_still_gives_the_tokens(
    tokenizer_dir, data_dir, tmp_path, monkeypatch
):
    from pruning_core import data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # tokens/ cannot be created below it
    monkeypatch.setattr(data, "_CORPUS_TOKENS", {})
    ids = corpus_tokens(tokenizer, "wikitext2-valid", data_dir, blocked)
    assert torch.equal(ids, tokenize_corpus(tokenizer, load_rows("wikitext2-valid", data_dir)))
