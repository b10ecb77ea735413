"""Zero-shot accuracy of an in-memory (possibly pruned) model with lm-evaluation-harness.

The seven standard tasks that exist in the local data dir run from the task configs in
``pruning_core/tasks/`` (lm-eval's stock prompts, targets and metrics, adapted to the local file layout).
Their data file names are relative, and the data dir is a run-time choice, so each run writes the
configs with absolute paths into a temporary dir that ``TaskManager(include_path=...)`` reads. Any other
name is one of lm-eval's stock tasks, whose data set comes from the Hugging Face hub.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import yaml

from pruning_core.data import DATA_DIR_ENV, default_data_dir
from pruning_core.errors import UsageError

# User-facing names, registered in lm-eval with LOCAL_PREFIX so they never clash with the stock tasks.
LOCAL_TASKS = ("boolq", "rte", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
ALL_LOCAL = "zeroshot"
LOCAL_PREFIX = "local_"
TASK_CONFIG_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@functools.lru_cache(maxsize=1)
def _stock_task_names() -> frozenset[str]:
    """Every task, group and tag name that lm-eval ships (indexing them takes a few seconds)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def _expand(names: Iterable[str]) -> list[str]:
    """Replace ALL_LOCAL by the local tasks, drop duplicates, keep the order given."""
    expanded: list[str] = []
    for name in names:
        for item in LOCAL_TASKS if name == ALL_LOCAL else (name,):
            if item not in expanded:
                expanded.append(item)
    return expanded


def _unknown_task_error(name: str) -> UsageError:
    return UsageError(
        f"unknown zero-shot task {name!r}; use '{ALL_LOCAL}' or a comma list of {', '.join(LOCAL_TASKS)} "
        "(or another lm-eval task name when online)"
    )


def parse_tasks(text: str) -> list[str]:
    """The task names of a ``--tasks`` value: ``zeroshot`` (all local tasks) or a comma list."""
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or "" in names:
        raise UsageError(
            f"--tasks {text!r} has an empty task name; use '{ALL_LOCAL}' or a list like arc_easy,boolq"
        )
    tasks = _expand(names)
    stock = [name for name in tasks if name not in LOCAL_TASKS]
    if stock:
        known = _stock_task_names()
        for name in stock:
            if name not in known:
                raise _unknown_task_error(name)
    return tasks


def write_task_configs(names: Iterable[str], data_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write the configs of the local tasks ``names`` into ``out_dir``, data files as absolute paths."""
    zeroshot_dir = Path(data_dir).expanduser().resolve() / "zeroshot"
    for name in names:
        config = yaml.safe_load((TASK_CONFIG_DIR / f"{name}.yaml").read_text())
        data_files = config["dataset_kwargs"]["data_files"]
        for split, file_name in data_files.items():
            path = zeroshot_dir / file_name
            if not path.is_file():
                raise UsageError(
                    f"zero-shot data file {path} not found; pass --data-dir DIR (or set {DATA_DIR_ENV}) "
                    "to the folder that holds zeroshot/"
                )
            data_files[split] = str(path)
        (Path(out_dir) / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid Hugging Face hub access inside the block; restore the caller's settings afterwards."""
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    # The libraries read the variables once, at import; once imported they consult these module flags.
    flag_modules = [sys.modules.get(name) for name in ("datasets.config", "huggingface_hub.constants")]
    saved_flags = [(module, module.HF_HUB_OFFLINE) for module in flag_modules if module is not None]
    for module, _ in saved_flags:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in saved_flags:
            module.HF_HUB_OFFLINE = value
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _load_stock(task_manager, names: list[str]) -> dict:
    try:
        return task_manager.load(names)["tasks"] if names else {}
    except OSError as err:  # datasets raises ConnectionError / FileNotFoundError when the hub is out of reach
        raise UsageError(
            f"{', '.join(names)}: not in the local data, and the data set could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}); run with network access or choose among "
            f"{', '.join(LOCAL_TASKS)}"
        ) from err


@contextmanager
def loaded_tasks(names: Iterable[str], data_dir: str | os.PathLike | None = None) -> Iterator[tuple]:
    """Yield ``(task_manager, {name: lm-eval Task})`` for ``names``, local ones read from ``data_dir``.

    A stock task can expand into several lm-eval tasks (a group); those appear under their own names.
    """
    from lm_eval.tasks import TaskManager

    names = _expand(names)
    local = [name for name in names if name in LOCAL_TASKS]
    stock = [name for name in names if name not in LOCAL_TASKS]
    with tempfile.TemporaryDirectory(prefix="zeroshot-tasks-") as config_dir:
        write_task_configs(local, data_dir or default_data_dir(), config_dir)
        task_manager = TaskManager(include_path=config_dir, include_defaults=bool(stock))
        tasks = dict(_load_stock(task_manager, stock))  # first, so that a missing network fails fast
        if local:
            with hub_offline():
                loaded = task_manager.load([LOCAL_PREFIX + name for name in local])["tasks"]
            tasks = {name: loaded[LOCAL_PREFIX + name] for name in local} | tasks
        yield task_manager, tasks


def chance_level(task, n_docs: int) -> float | None:
    """Expected accuracy of a uniform random guess over the first ``n_docs`` documents."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return None
    docs = [task.eval_docs[i] for i in range(n_docs)]
    return sum(1.0 / len(task.doc_to_choice(doc)) for doc in docs) / max(n_docs, 1)


def _task_report(task, metrics: dict, n_docs: int) -> dict:
    report = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in metrics:
            report[metric] = metrics[f"{metric},none"]
            stderr = metrics.get(f"{metric}_stderr,none")
            if isinstance(stderr, float):
                report[f"{metric}_stderr"] = stderr
    report["n"] = n_docs
    report["chance"] = chance_level(task, n_docs)
    return report


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: str | Iterable[str],
    *,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict:
    """Zero-shot acc (and acc_norm where the task has it) of ``model`` on ``tasks``.

    ``tasks`` is ``"zeroshot"``, a comma list, or a list of names; ``limit`` caps the documents per task
    (the first ones of the split). ``device``, when given, moves the model there first; otherwise the
    model is evaluated where it is.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks) if isinstance(tasks, str) else parse_tasks(",".join(tasks))
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit} must be a positive number of documents per task; drop it for all")
    if device is not None:
        model.to(device)
    language_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with loaded_tasks(names, data_dir) as (task_manager, task_objects):
        offline = all(name in LOCAL_TASKS for name in names)
        with hub_offline() if offline else nullcontext():
            output = simple_evaluate(
                model=language_model,
                tasks=list(task_objects.values()),
                task_manager=task_manager,
                limit=limit,
                num_fewshot=0,
                log_samples=False,
            )
    by_lm_eval_name = {task.task_name: (name, task) for name, task in task_objects.items()}
    reports = {}
    for lm_eval_name, (name, task) in by_lm_eval_name.items():
        n_docs = output["n-samples"][lm_eval_name]["effective"]
        reports[name] = _task_report(task, output["results"][lm_eval_name], n_docs)
    accuracies = [report["acc"] for report in reports.values() if "acc" in report]
    mean_acc = sum(accuracies) / len(accuracies) if accuracies else None
    return {"tasks": reports, "mean_acc": mean_acc, "limit": limit}
