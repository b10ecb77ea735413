"""Helpers the benchmark scripts share: argument parsing, the real model and data, JSON output."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def evaluator_parser(
    description: str, nsamples: int = 16, fitness_windows: int = 4
) -> argparse.ArgumentParser:
    """`parser` plus the flags that set up a fitness evaluator (see `evaluator_settings`)."""
    p = parser(description)
    p.add_argument("--nsamples", type=int, default=nsamples, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--fitness-windows", type=int, default=fitness_windows)
    p.add_argument("--fitness-seqlen", type=int, default=256)
    p.add_argument("--cache-dir", default=None)
    return p


def evaluator_settings(args: argparse.Namespace):
    from fitness.setup import EvaluatorSettings

    return EvaluatorSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        nsamples=args.nsamples,
        calib_seqlen=args.calib_seqlen,
        fitness_windows=args.fitness_windows,
        fitness_seqlen=args.fitness_seqlen,
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
