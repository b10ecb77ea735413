"""Plugins, checkpoints and configs are data (JSON + the formula grammar), so a malicious one runs nothing
and is refused with one clear line; no product module can unpickle or evaluate text; the embedded Ray
listens on loopback only."""

from __future__ import annotations

import ast
import contextlib
import ipaddress
import json
import os
import pickle
from pathlib import Path

import psutil
import pytest
from search_fixtures import evaluator_settings, search_settings

from metric_search import rundir
from metric_search.cli import main as search_main
from metric_search.config import ExecutionSettings
from metric_search.dispatch import EvaluatorPool, Job
from metric_search.search import start_run
from pruning_core.cli import main as core_main
from pruning_core.cli_common import run_cli
from pruning_core.scorers import base

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("pruning_core", "primitives", "fitness", "metric_search")


class Payload:
    """Unpickling this object runs a shell command: what pickle.load of a hostile file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def attacks(marker: Path) -> dict[str, bytes]:
    """Plugin files that each try to create ``marker``, and what is in the one error line."""
    touch = f"touch {marker}"
    good = {"format": "metric-search-scorer", "version": 1, "name": "evil", "formula": "abs(W) * X",
            "stats": ["X"], "group": "row"}  # fmt: skip

    def plugin(**changes) -> bytes:
        return json.dumps({**good, **changes}).encode()

    return {
        "formula-import": plugin(formula=f"__import__('os').system('{touch}')"),
        "formula-exec": plugin(formula=f"exec(\"__import__('os').system('{touch}')\")"),
        "formula-eval": plugin(formula=f"eval('{touch}')"),
        "formula-attribute": plugin(formula="W.__class__.__base__.__subclasses__()"),
        "formula-lambda": plugin(formula=f"(lambda: __import__('os').system('{touch}'))()"),
        "stats-import": plugin(stats=[f"__import__('os').system('{touch}')"]),
        "name-import": plugin(name=f"__import__('os').system('{touch}')"),
        "group-import": plugin(group=f"__import__('os').system('{touch}')"),
        "reduce-field": plugin(__reduce__=["os.system", [touch]]),
        "jsonpickle-field": plugin(**{"py/reduce": [{"py/function": "os.system"}, {"py/tuple": [touch]}]}),
        "pickle-file": pickle.dumps(Payload(touch)),
        "yaml-tag": f"!!python/object/apply:os.system ['{touch}']".encode(),
    }


@pytest.fixture
def plugins_in_tmp(isolated_plugins, tmp_path, monkeypatch):
    """Isolated plugin folders, run from tmp_path so a relative path an attack names lands there."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("attack", sorted(attacks(Path("m"))))
def test_malicious_plugin_runs_nothing_and_is_refused(attack, tmp_path, plugins_in_tmp, capfd):
    marker = tmp_path / "pwned"
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "evil.json").write_bytes(attacks(marker)[attack])
    registry = dict(base._REGISTRY)
    assert run_cli(core_main, ["scorers", "--plugins", str(folder)]) == 2
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: plugin {folder / 'evil.json'}"), err
    assert not marker.exists()
    assert registry == base._REGISTRY


def test_code_in_a_plugin_description_stays_inert_text(tmp_path, plugins_in_tmp, capfd):
    """Free-text fields are accepted as text and never interpreted."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "plugins"
    folder.mkdir()
    touch = f"__import__('os').system('touch {marker}')"
    data = {"format": "metric-search-scorer", "version": 1, "name": "inert", "formula": "abs(W) * X",
            "stats": ["X"], "group": "row", "description": touch, "provenance": {"note": touch}}  # fmt: skip
    (folder / "inert.json").write_text(json.dumps(data))
    assert run_cli(core_main, ["scorers", "--plugins", str(folder), "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capfd.readouterr().out)["scorers"]}
    assert listed["inert"]["kind"] == "plugin" and listed["inert"]["stats"] == ["X"]
    assert not marker.exists()


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def attack_text(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def poison_population(data: dict, marker: Path) -> None:
    data["population"] = [{"formula": attack_text(marker), "canonical": "abs(W)"}]
    data["candidates"] = {"abs(W)": {"formula": "abs(W)", "proxy": None, "ppl": None}}


def poison_candidate(data: dict, marker: Path) -> None:
    data["candidates"] = {"abs(W)": {"formula": attack_text(marker), "proxy": None, "ppl": None}}


RUN_ATTACKS = {
    "checkpoint-population": (rundir.CHECKPOINT, lambda p, m: edit_json(p, lambda d: poison_population(d, m)),
                              "holds a formula the grammar rejects"),
    "checkpoint-candidate": (rundir.CHECKPOINT, lambda p, m: edit_json(p, lambda d: poison_candidate(d, m)),
                             "holds a formula the grammar rejects"),
    "checkpoint-pickle": (rundir.CHECKPOINT, lambda p, m: p.write_bytes(pickle.dumps(Payload(f"touch {m}"))),
                          "is not a valid checkpoint"),
    "config-seed-formula": (rundir.CONFIG, lambda p, m: edit_json(
        p, lambda d: d["settings"].update(seed_formulas=[attack_text(m)])), "holds a seed formula the grammar rejects"),
    "config-extra-field": (rundir.CONFIG, lambda p, m: edit_json(
        p, lambda d: d["settings"].update(__reduce__=["os.system", [f"touch {m}"]])),
        "is not a valid metric_search config"),
    "config-pickle": (rundir.CONFIG, lambda p, m: p.write_bytes(pickle.dumps(Payload(f"touch {m}"))),
                      "is not a valid metric_search config"),
}  # fmt: skip


@pytest.mark.parametrize("attack", sorted(RUN_ATTACKS))
def test_malicious_run_files_run_nothing_and_resume_is_refused(
    attack, tmp_path, search_model, monkeypatch, capfd
):
    monkeypatch.chdir(tmp_path)
    marker, run_dir = tmp_path / "pwned", tmp_path / "run"
    start_run(search_settings(search_model, tmp_path / "cache", 2, 4), run_dir, "run", ExecutionSettings())
    name, tamper, words = RUN_ATTACKS[attack]
    before = (run_dir / name).read_bytes()
    tamper(run_dir / name, marker)
    assert (run_dir / name).read_bytes() != before
    tampered = {p.name: p.read_bytes() for p in run_dir.iterdir()}

    for argv in (
        ["--resume", str(run_dir), "--quiet"],
        ["export", str(run_dir), "--dir", str(tmp_path / "out")],
    ):
        assert run_cli(search_main, argv) == 2
        err = capfd.readouterr().err
        lines = err.splitlines()
        assert len(lines) == 1 and words in lines[0], err
        assert not marker.exists()
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == tampered
    assert not (tmp_path / "out").exists()


# Builtins that run text, SymPy's string parsers (they eval), torch.load (it unpickles) and YAML's
# object-building loaders (safe_load is fine); model.eval() and re.compile() are other functions with the
# same names, so builtins count only when called bare.
BANNED_BUILTINS = {"eval", "exec", "compile", "__import__"}
BANNED_ANY_OWNER = {"sympify", "parse_expr"}
BANNED_METHODS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                  *(("builtins", name) for name in BANNED_BUILTINS)}  # fmt: skip
BANNED_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}


def banned_uses(source: str) -> list[str]:
    """Calls that run or unpickle text, and imports of modules that do, in Python source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in BANNED_BUILTINS | BANNED_ANY_OWNER:
                found.append(f"{node.func.id}() at line {node.lineno}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if node.func.attr in BANNED_ANY_OWNER or (owner, node.func.attr) in BANNED_METHODS:
                found.append(f"{owner}.{node.func.attr}() at line {node.lineno}")
    return found


def test_no_product_module_unpickles_or_evaluates_text():
    probe = "import pickle\neval('1')\ntorch.load('x')\nsympy.sympify('W')\nmodel.eval()\nre.compile('x')\n"
    assert banned_uses(probe) == ["import pickle", "eval() at line 2", "torch.load() at line 3",
                                  "sympy.sympify() at line 4"]  # fmt: skip
    sources = [p for package in PRODUCT for p in sorted((REPO / package).rglob("*.py"))]
    assert len(sources) > 30
    offenders = {str(p.relative_to(REPO)): banned_uses(p.read_text()) for p in sources}
    assert {k: v for k, v in offenders.items() if v} == {}


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback on a dual-stack socket
    return (mapped or address).is_loopback


def test_embedded_ray_listens_on_loopback_only(local_ray, search_model, search_cache):
    settings = evaluator_settings(search_model, search_cache).as_dict()
    pool = EvaluatorPool(settings, workers=1, threads=1, gpu_share=0.0, hard_timeout=300.0)
    try:
        assert pool.run([Job("abs(W) * X", "proxy")])[0]["reason"] is None  # an actor is up and working
        names = {}  # pid -> name of this process and every Ray process it started
        for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                names[process.pid] = process.name()
        listening = [c for c in psutil.net_connections(kind="inet")
                     if c.pid in names and c.status == psutil.CONN_LISTEN]  # fmt: skip
    finally:
        pool.shutdown()
    servers = {pid for pid, name in names.items() if name in ("gcs_server", "raylet")}
    assert len(servers) == 2 and servers <= {c.pid for c in listening}
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and is_loopback("::ffff:127.0.0.1")
    exposed = [(c.pid, c.laddr.ip, c.laddr.port) for c in listening if not is_loopback(c.laddr.ip)]
    assert exposed == [] and len(listening) >= 3
