"""What every CLI of the project shares: one-line errors with exit code 2, --json output, common flags."""

from __future__ import annotations

import argparse
import json
import sys

from pruning_core.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus an error; the project promises one clear line and exit code 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; a UsageError becomes one stderr line and exit code 2, never a traceback."""
    try:
        return main(argv) or 0
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2-135m", help="embedded name, local dir, .gguf file or hub id"
    )
    parser.add_argument(
        "--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16"
    )
    parser.add_argument("--device", default=None, help="cuda when present, else cpu")
    parser.add_argument(
        "--cache-dir", default=None, help="model cache (default $XDG_CACHE_HOME/metric-search)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="data folder (default $METRIC_SEARCH_DATA_DIR or ../shared/data)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(human)
