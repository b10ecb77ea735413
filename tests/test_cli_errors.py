"""Bad input to `python -m pruning_core` eval and model loading: one clear stderr line, exit code 2, no
traceback. prune flags, formulas and plugins are in test_reliability_inputs.py."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args, module="pruning_core"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


def assert_clean_error(proc, fragment):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["eval", "--model", "/nonexistent/model"], "neither an embedded name"),
        (["eval", "--model", "/nonexistent/model.gguf"], "does not exist"),
        (["eval", "--model", "smollm9"], "neither an embedded name"),
        (["eval", "--data", "wikitext103"], "unknown dataset"),
        (["eval", "--max-windows", "0"], "--max-windows must be >= 1"),
        (["eval", "--seqlen", "abc"], "invalid int value"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment):
    assert_clean_error(run_cli(*args), fragment)


def test_corrupt_gguf_and_too_long_seqlen(tmp_path, tiny_model_dir):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    assert_clean_error(
        run_cli("eval", "--model", str(bad), "--cache-dir", str(tmp_path)), "corrupt or truncated"
    )
    model = tiny_model_dir("llama")
    assert_clean_error(
        run_cli("eval", "--model", str(model), "--seqlen", "4096"), "longer than the model allows"
    )
