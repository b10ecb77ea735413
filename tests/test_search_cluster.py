"""A short search on a two-node local Ray cluster (`ray.cluster_utils.Cluster`), joined the way
`--address HOST:PORT` joins one: the actors land on both nodes and, with no model, data or cache there,
run the same search from what the driver ships through Ray's object store."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import make_tiny_model
from search_fixtures import actor_places, evaluator_settings, outcome, run_in_process

from fitness.setup import EvaluatorSettings
from metric_search import cluster
from metric_search.config import ExecutionSettings, SearchSettings
from metric_search.search import Search, start_run


@pytest.fixture(autouse=True)
def no_ray_left_running():
    """Each test here makes its own Ray: the one other modules' tests leave running (local_ray) ends first."""
    import ray

    ray.shutdown()


@pytest.fixture
def cluster_left_running():
    """A one-node Ray cluster (1 CPU) that, like `ray start`, leaves its address for a plain ray.init()."""
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_a_search_over_two_nodes_without_model_data_or_cache_runs_the_same_search(tokenizer_dir, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    """Joined the --address way, a two-node cluster runs the search on both nodes. The driver prepares the
    model, statistics and windows once and ships them: the model folder and the cache are moved away before
    any actor starts and both nodes have a bogus data folder in their environment, yet the hall of fame,
    every result and the last population equal a one-node run's."""
    import ray
    from ray.cluster_utils import Cluster
    from transformers import AutoTokenizer

    from fitness import setup

    model = tmp_path / "tiny"
    make_tiny_model("llama", 1).save_pretrained(model)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model)
    evaluator = EvaluatorSettings(model=str(model), cache_dir=str(tmp_path / "cache"), nsamples=4, calib_seqlen=32,
                                  fitness_windows=2, fitness_seqlen=32, top_windows=4)  # fmt: skip
    settings = SearchSettings(
        generations=2, population=8, seed=3, confirm=2, final_top=0, evaluator=evaluator
    )
    assert cluster.connect(None, num_cpus=2) is True
    try:
        run_in_process(settings, tmp_path / "one-node", workers=2)
    finally:
        ray.shutdown()

    prepare = setup.prepare_shipment

    def prepare_then_hide_the_files(*args, **kwargs):
        shipment = prepare(*args, **kwargs)
        model.rename(tmp_path / "model-gone")
        (tmp_path / "cache").rename(tmp_path / "cache-gone")
        return shipment

    monkeypatch.setattr(setup, "prepare_shipment", prepare_then_hide_the_files)
    no_data = {"env_vars": {"METRIC_SEARCH_DATA_DIR": str(tmp_path / "no-data-here")}}
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **no_data})
    nodes.add_node(num_cpus=1, **no_data)
    seen_nodes = set()

    def record(event, **info):
        if event == "result":
            seen_nodes.add(info["where"]["node"])  # the node whose actor computed this result

    try:
        assert cluster.connect(nodes.address, num_cpus=None) is True  # the --address path
        cluster_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        execution = ExecutionSettings(workers=2, address=nodes.address, progress=False)
        run_dir = tmp_path / "two-nodes"
        start_run(settings, run_dir, "two-nodes", execution)
        Search(settings, execution, run_dir, observer=record).run()
    finally:
        ray.shutdown()
        nodes.shutdown()
    assert len(cluster_nodes) == 2 and seen_nodes == cluster_nodes
    assert not model.exists() and (tmp_path / "model-gone").is_dir()
    assert outcome(run_dir) == outcome(tmp_path / "one-node")


def test_the_embedded_ray_never_joins_a_cluster_left_running_on_the_machine(cluster_left_running):
    """Without --address the search starts its own loopback Ray, although `ray start` (here a 1-CPU
    cluster) left an address for a plain ``ray.init()`` to find."""
    import ray

    assert cluster.connect(None, num_cpus=2) is True
    try:
        nodes = [node for node in ray.nodes() if node["Alive"]]
        assert [node["NodeManagerAddress"] for node in nodes] == ["127.0.0.1"]
        assert ray.cluster_resources()["CPU"] == 2.0  # not the cluster's 1
        assert ray.get_runtime_context().gcs_address != cluster_left_running.address
    finally:
        ray.shutdown()


def test_a_runtime_env_file_reaches_every_actor(tmp_path, search_model):
    """--runtime-env FILE.json: read by the CLI, passed to Ray as the job's default for every actor."""
    import os

    import ray

    from metric_search.cli import plan_search

    path = tmp_path / "env.json"
    path.write_text(json.dumps({"env_vars": {"METRIC_SEARCH_PROBE": "shipped"}}))
    plan = plan_search(
        ["--model", str(search_model), "--runtime-env", str(path), "--run-dir", str(tmp_path / "r")]
    )
    assert plan.execution.runtime_env == {"env_vars": {"METRIC_SEARCH_PROBE": "shipped"}}
    assert cluster.connect(None, 1, runtime_env=plan.execution.runtime_env) is True
    try:
        probe = ray.remote(num_cpus=0)(lambda: os.environ.get("METRIC_SEARCH_PROBE"))
        assert ray.get(probe.remote()) == "shipped"
        assert "METRIC_SEARCH_PROBE" not in os.environ  # the driver's own environment is untouched
    finally:
        ray.shutdown()


@pytest.mark.parametrize(
    "workers, threads, per_gpu, device, resources, expected",
    [
        (None, 1, 4, None, {"CPU": 8.0, "GPU": 2.0}, (8, 0.25)),  # the cluster's GPUs, shared by 4
        (None, 2, 1, None, {"CPU": 16.0}, (8, 0.0)),  # CPU-only cluster: CPUs / threads
        (None, 1, 2, "cpu", {"CPU": 6.0, "GPU": 1.0}, (6, 0.0)),  # --device cpu keeps GPUs out
        (3, 1, 2, "cuda", {"CPU": 1.0}, (3, 0.5)),  # --workers wins; cuda asked for
        (None, 4, 1, None, {"CPU": 2.0}, (1, 0.0)),  # never fewer than one actor
    ],
)
def test_actor_layout_follows_the_cluster_unless_told(workers, threads, per_gpu, device, resources, expected):
    assert cluster.actor_layout(workers, threads, per_gpu, device, resources) == expected


def test_two_actors_per_gpu_hold_every_gpu_and_a_pool_that_cannot_fit_names_the_flag(
    search_model, search_cache
):
    """A fake GPU on a CPU Ray: the default layout places 2 actors of 0.5 GPU (the GPU is all reserved),
    and every actor that runs a job holds exactly that share. (One GPU, not more: each actor imports
    torch, which on a 2-core machine costs most of this test.) Pools the cluster cannot hold are refused
    up front with the flag that helps, instead of waiting forever."""
    import time

    import ray

    from metric_search.dispatch import EvaluatorPool, Job, PoolError

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        with pytest.raises(
            PoolError, match=r"need 4 CPU but the Ray cluster has 2; pass fewer --workers or --threads"
        ):
            EvaluatorPool({}, workers=4, threads=1, gpu_share=0.0, hard_timeout=60.0)
        with pytest.raises(
            PoolError, match=r"need 2 GPU .* has 1; pass fewer --workers or more --actors-per-gpu"
        ):
            EvaluatorPool({}, workers=2, threads=1, gpu_share=1.0, hard_timeout=60.0)

        workers, share = cluster.actor_layout(None, 1, 2, None, ray.cluster_resources())
        assert (workers, share) == (2, 0.5)
        evaluator = replace(evaluator_settings(search_model, search_cache), device="cpu")
        pool = EvaluatorPool(evaluator.as_dict(), workers, 1, share, hard_timeout=300.0)
        try:
            deadline = time.monotonic() + 60
            while ray.available_resources().get("GPU", 0.0) > 1e-9 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0)  # 2 x 0.5 placed
            results = pool.run([Job("abs(W) * X", "proxy"), Job("abs(W)", "proxy")])
            assert all(r["reason"] is None for r in results)
            shares = [w["resources"].get("GPU") for w in actor_places(pool)]
            assert shares and all(s == pytest.approx(0.5) for s in shares)
        finally:
            pool.shutdown()
    finally:
        ray.shutdown()
