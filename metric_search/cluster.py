"""Connecting to Ray: an embedded instance bound to loopback with no dashboard, or an existing cluster
(``--address auto|HOST:PORT``), failing with one clear line when nothing answers."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

from pruning_core.errors import UsageError

CONNECT_TIMEOUT_S = 10.0
OBJECT_STORE_BYTES = 256 * 2**20  # results are small dicts; the default (30% of RAM) is wasted here


RUNTIME_ENV_EXAMPLE = '{"pip": ["metric-search"]}'


def load_runtime_env(path: str | None) -> dict | None:
    """A Ray runtime_env read from a JSON file (data, never evaluated) and checked by Ray's own
    ``RuntimeEnv``, or None without a file."""
    if path is None:
        return None
    fix = f"pass a JSON object such as {RUNTIME_ENV_EXAMPLE} (see Ray's runtime_env docs)"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UsageError(f"--runtime-env {path}: cannot read it ({err.strerror or err}); {fix}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"--runtime-env {path} is not JSON ({err}); {fix}") from err
    if not isinstance(data, dict):
        raise UsageError(f"--runtime-env {path} holds a JSON {type(data).__name__}, not an object; {fix}")
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**data)
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"--runtime-env {path} is not a valid Ray runtime_env: {first[:200]}; {fix}"
        ) from err
    return data


def _probe(address: str) -> None:
    """A TCP connect to HOST:PORT, so an address where nothing listens fails fast instead of retrying."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--address must be 'auto' or HOST:PORT (e.g. 10.0.0.5:6379), got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise UsageError(
            f"nothing answers at --address {address} ({err.strerror or err}); start the head with "
            f"`ray start --head` there, or omit --address for a local Ray"
        ) from err


def _init_on_loopback(**options) -> None:
    """Ray replaces a 127.0.0.1 node address by the machine's public IP, and its servers bind to the
    node address, unless multi-machine clusters are switched off; switch them off for this one call.
    ``address="local"``: without it Ray would join a cluster that `ray start` left on this machine."""
    import ray
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
    bound = {node["NodeManagerAddress"] for node in ray.nodes()}
    if bound != {"127.0.0.1"}:
        print(
            f"warning: the local Ray instance uses address {sorted(bound)}, not loopback only",
            file=sys.stderr,
        )


def actor_layout(
    workers: int | None, threads: int, actors_per_gpu: int, device: str | None, resources: dict
) -> tuple[int, float]:
    """(evaluator actors, GPU share of each) on a Ray instance with ``resources``: GPU actors when the
    device asks for CUDA, or when no device was given and the cluster has GPUs (a CPU-only driver can
    lead GPU workers); ``actors_per_gpu`` share each GPU. Without ``workers``, the count follows the
    cluster: every GPU times ``actors_per_gpu``, or as many ``threads``-CPU actors as its CPUs hold."""
    gpus = resources.get("GPU", 0.0)
    use_gpu = device.startswith("cuda") if device else gpus > 0
    share = 1.0 / actors_per_gpu if use_gpu else 0.0
    if workers is None:
        workers = int(gpus) * actors_per_gpu if use_gpu else int(resources.get("CPU", 0.0)) // threads
    return max(1, workers), share


def check_address(address: str | None) -> None:
    """Fail fast, before any work, when --address names a port where nothing listens."""
    if address not in (None, "auto"):
        _probe(address)


def connect(
    address: str | None, num_cpus: int | None, use_gpu: bool = False, runtime_env: dict | None = None
) -> bool:
    """Start or join Ray (``num_cpus`` None: all of this machine's); True when this call started it
    (the caller then shuts it down). ``runtime_env`` becomes the job's default for every actor.
    An instance already running in this process (a test, an embedding program) is used as is."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-report thread phoning home
    common = {"log_to_driver": False, "logging_level": logging.WARNING, "namespace": "metric_search"}
    if runtime_env is not None:
        common["runtime_env"] = runtime_env
    if address is None:
        gpus = None if use_gpu else 0  # None: Ray counts the GPUs itself
        _init_on_loopback(num_cpus=num_cpus, num_gpus=gpus, object_store_memory=OBJECT_STORE_BYTES, **common)
        return True
    check_address(address)
    try:
        ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"cannot join the Ray cluster at --address {address}: {first[:200]}; start one with `ray start --head`"
        ) from err
    return True
