"""Atomic writes and cache names (pruning_core.files): a failed write leaves the old file and no temp."""

from __future__ import annotations

import hashlib
import json

import pytest

from pruning_core import files


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "data.bin"
    with files.atomic_path(target) as tmp:
        tmp.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_dir_fills_an_empty_target_or_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), files.atomic_dir(target) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("killed mid-save")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()  # an empty folder a user made is filled
    with files.atomic_dir(target) as staging:
        (staging / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (target / "config.json").read_text() == "{}"


def test_hashes_match_hashlib(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 40_000  # several read chunks
    path.write_bytes(data)
    assert files.file_sha256(path) == hashlib.sha256(data).hexdigest()
    key = {"b": 1, "a": [2, 3]}
    expected = hashlib.sha256(b'{"a": [2, 3], "b": 1}').hexdigest()[:24]
    assert files.key_digest(key) == expected == files.key_digest(json.loads(json.dumps(key)))


def test_strict_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        files.atomic_write_json(tmp_path / "x.json", {"v": float("nan")})
    files.atomic_write_json(tmp_path / "x.json", {"v": float("inf")}, allow_nan=True)
    assert json.loads((tmp_path / "x.json").read_text())["v"] == float("inf")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
