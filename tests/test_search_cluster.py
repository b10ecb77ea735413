"""A short search on a two-node local Ray cluster (`ray.cluster_utils.Cluster`), joined the way
`--address HOST:PORT` joins one: the actors land on both nodes and the run completes."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model

from fitness.setup import EvaluatorSettings, build_evaluator
from metric_search import cluster, rundir
from metric_search.config import ExecutionSettings, SearchSettings
from metric_search.search import Search, start_run


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_search_spreads_over_two_nodes(two_nodes, tokenizer_dir, tmp_path):
    import ray
    from transformers import AutoTokenizer

    model = tmp_path / "tiny"
    make_tiny_model("llama", 1).save_pretrained(model)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model)
    evaluator = EvaluatorSettings(model=str(model), cache_dir=str(tmp_path / "cache"), nsamples=4, calib_seqlen=32,
                                  fitness_windows=2, fitness_seqlen=32)  # fmt: skip
    build_evaluator(evaluator)  # statistics once, shared by both nodes through the cache folder

    assert cluster.connect(two_nodes.address, num_cpus=2) is True  # the --address path
    settings = SearchSettings(generations=2, population=8, seed=1, confirm=2, evaluator=evaluator)
    execution = ExecutionSettings(workers=2, address=two_nodes.address, progress=False)
    run_dir = tmp_path / "run"
    start_run(settings, run_dir, "two-nodes", execution)
    seen_nodes = set()

    def record(event, **info):
        if event == "result":
            seen_nodes.add(info["where"]["node"])  # the node whose actor computed this result

    state = Search(settings, execution, run_dir, observer=record).run()
    cluster_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(cluster_nodes) == 2 and seen_nodes == cluster_nodes
    assert state.generation == 1 and state.hall_of_fame
    hall = json.loads((run_dir / rundir.HALL_OF_FAME).read_text())
    assert hall["entries"][0]["formula"] == state.hall_of_fame[0]
