"""The GPU path in one run, for a machine with CUDA: perplexity, Wanda and SparseGPT prunes (each also in
float32 on the CPU, the reference values), the fitness overhead benchmark, and a short GPU-profile search
with 1 and with 4 actors per GPU. Every step is its own `--json` process with a deadline; a failed or late
step is reported and the others still run. Without CUDA it says so in one line and exits with 2.

Printed per step: its numbers and seconds; for eval and prunes the CUDA / CPU perplexity ratio; for the
searches candidates per minute at each rung (from the run's candidates.jsonl) and the chosen formula.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from common import parser, report

REPO = Path(__file__).resolve().parent.parent
PRUNE_SETTING = ["--pattern", "2:4", "--calib", "c4", "--nsamples", "16", "--seed", "0"]
EVAL_WINDOWS = ["--seqlen", "512", "--max-windows", "16"]


def run_json(command: list[str], deadline_s: float) -> dict:
    """The last stdout line of ``command`` as JSON plus its wall time, or the failure in one line."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=deadline_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {deadline_s:.0f} s", "seconds": deadline_s}
    seconds = round(time.perf_counter() - started, 2)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}", "seconds": seconds}
    return {**json.loads(lines[-1]), "seconds": seconds}


def core(*args: str) -> list[str]:
    return [sys.executable, "-m", "pruning_core", *args, "--json"]


def with_reference(
    label: str, args: list[str], common: list[str], dtype: list[str], deadline_s: float
) -> dict:
    """``args`` on CUDA (``dtype``, else CUDA's default) and on the CPU in float32; ppl ratio CUDA / CPU."""
    cuda = run_json(core(*args, *common, "--device", "cuda", *dtype), deadline_s)
    cpu = run_json(core(*args, *common, "--device", "cpu", "--dtype", "float32"), deadline_s)
    step = {"cuda": _brief(cuda), "cpu_float32": _brief(cpu)}
    if "ppl" in cuda and "ppl" in cpu:
        step["ppl_cuda_over_cpu"] = cuda["ppl"] / cpu["ppl"]
    print(f"{label}: {step}", file=sys.stderr)
    return step


def _brief(result: dict) -> dict:
    keep = ("ppl", "sparsity", "seconds_prune", "seconds_eval", "seconds", "dtype", "device", "error")
    return {k: result[k] for k in keep if k in result}


def _shell_words(text: str) -> list[str]:
    """--search-args as the search's argv (a bad quote is a usage error, not a traceback)."""
    try:
        return shlex.split(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f'{err}; quote it as a shell would, e.g. "--nsamples 32"') from err


def search_throughput(run_dir: Path, seconds: float) -> dict:
    """Candidates per minute at each rung over the whole run, from the run's own record."""
    path = run_dir / "candidates.jsonl"
    if not path.is_file():
        return {}
    rungs = Counter(json.loads(line)["fidelity"] for line in path.read_text().splitlines() if line.strip())
    return {rung: round(count * 60.0 / seconds, 2) for rung, count in sorted(rungs.items())}


def search(actors_per_gpu: int, args, scratch: Path) -> dict:
    run_dir = scratch / f"search-{actors_per_gpu}-per-gpu"
    command = [sys.executable, "-m", "metric_search", "--profile", "gpu", "--model", args.model,
               "--generations", str(args.generations), "--actors-per-gpu", str(actors_per_gpu),
               "--run-dir", str(run_dir), "--quiet", "--json"]  # fmt: skip
    if args.population:
        command += ["--population", str(args.population)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    command += args.search_args
    result = run_json(command, args.step_timeout)
    step = {k: result.get(k) for k in ("generations", "seconds", "error") if k in result}
    chosen = result.get("chosen") or {}
    step["chosen"] = chosen.get("formula")
    step["candidates_per_minute"] = search_throughput(run_dir, result["seconds"])
    print(f"search, {actors_per_gpu} actors per GPU: {step}", file=sys.stderr)
    return step


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--generations", type=int, default=3, help="generations of each search (3)")
    p.add_argument("--population", type=int, default=None, help="population of each search (the profile's)")
    p.add_argument(
        "--search-args",
        type=_shell_words,
        default="",
        help='more search flags, e.g. "--nsamples 32 --final-top 1" for a short lease',
    )
    p.add_argument("--step-timeout", type=float, default=900.0, help="seconds any one step may take")
    p.add_argument("--skip", default="", help="comma list of steps to leave out: eval,prune,overhead,search")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(
            "no CUDA: gpu_check.py measures the GPU path; run it on a machine with a CUDA GPU",
            file=sys.stderr,
        )
        sys.exit(2)
    skip = set(filter(None, args.skip.split(",")))
    if args.device not in (None, "cuda"):
        print(
            f"--device {args.device}: gpu_check.py runs the CUDA side on cuda; omit --device", file=sys.stderr
        )
        sys.exit(2)
    common = ["--model", args.model] + (["--data-dir", args.data_dir] if args.data_dir else [])
    dtype = ["--dtype", args.dtype] if args.dtype else []
    result: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    if "eval" not in skip:
        result["eval"] = with_reference(
            "eval", ["eval", "--data", "wikitext2-test", *EVAL_WINDOWS], common, dtype, args.step_timeout
        )
    if "prune" not in skip:
        for scorer in ("wanda", "sparsegpt"):
            prune = ["prune", "--scorer", scorer, *PRUNE_SETTING, "--eval", "wikitext2-test", *EVAL_WINDOWS]
            result[f"prune_{scorer}"] = with_reference(
                f"prune {scorer}", prune, common, dtype, args.step_timeout
            )
    if "overhead" not in skip:
        overhead = [sys.executable, str(REPO / "benchmarks" / "fitness_overhead.py"), "--json", "--device",
                    "cuda", "--model", args.model, "--rounds", "3", *dtype]  # fmt: skip
        result["fitness_overhead"] = run_json(overhead, args.step_timeout)
    if "search" not in skip:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
            result["search"] = {str(n): search(n, args, Path(scratch)) for n in (1, 4)}
    report(result, args.json)


if __name__ == "__main__":
    main()
