"""The readable end of a run: fitness.png (best / median per generation), pareto.png (fitness vs formula
size) and report.md (top formulas, baselines on the same fitness data, per-generation table)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from metric_search import rundir
from metric_search.checkpoint import SearchState
from metric_search.results import baseline_entries, hall_of_fame_entries
from primitives import parse_formula
from primitives.tree import size

FIDELITY_LABELS = {"proxy": "proxy (layer reconstruction error)", "ppl": "perplexity (fitness data)"}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _fmt(value, digits: int = 4) -> str:
    value = _number(value)
    return "-" if value is None else f"{value:.{digits}g}"


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    rundir.atomic_write_bytes(path, buffer.getvalue())


def plot_fitness(state: SearchState, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fidelities = [f for f in ("ppl", "proxy") if any(_number(h.get(f"best_{f}")) for h in state.history)]
    fidelities = fidelities or ["ppl"]
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(fidelities), figsize=(6 * len(fidelities), 4), squeeze=False)
    generations = [h.get("generation") for h in state.history]
    baselines = baseline_entries(state)
    for ax, fidelity in zip(axes[0], fidelities):
        for stat, style in (("best", "-o"), ("median", "--s")):
            values = [_number(h.get(f"{stat}_{fidelity}")) for h in state.history]
            ax.plot(generations, [math.nan if v is None else v for v in values], style, ms=3, label=stat)
        for name, entry in sorted(baselines.items()):
            if _number(entry.get(fidelity)) is not None:
                ax.axhline(entry[fidelity], lw=0.8, alpha=0.7, ls=":", color="gray")
                ax.annotate(name, (generations[0] if generations else 0, entry[fidelity]), fontsize=7)
        ax.set_xlabel("generation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(FIDELITY_LABELS[fidelity])
        ax.set_title(f"population {fidelity} (lower is better)")
        ax.legend()
    _save(fig, path)


def pareto_front(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points no other point beats in both size and fitness, by increasing size."""
    front, best = [], math.inf
    for nodes, value in sorted(points):
        if value < best:
            front.append((nodes, value))
            best = value
    return front


def plot_pareto(state: SearchState, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    for ax, fidelity in zip(axes[0], ("ppl", "proxy")):
        points = [
            (entry["size"], entry[fidelity]["fitness"])
            for entry in state.candidates.values()
            if entry.get(fidelity) and _number(entry[fidelity]["fitness"]) is not None
        ]
        if points:
            ax.scatter(*zip(*points), s=10, alpha=0.5, label="candidates")
            front = pareto_front(points)
            ax.step(*zip(*front), where="post", color="C3", marker="o", ms=4, label="Pareto front")
        for name, entry in sorted(baseline_entries(state).items()):
            if _number(entry.get(fidelity)) is not None:
                nodes = size(parse_formula(entry["canonical"]))
                ax.scatter([nodes], [entry[fidelity]], marker="x", color="k")
                ax.annotate(name, (nodes, entry[fidelity]), fontsize=7)
        ax.set_xlabel("formula size (nodes of the canonical form)")
        ax.set_ylabel(FIDELITY_LABELS[fidelity])
        ax.set_yscale("log")
        ax.set_title(f"{fidelity} vs size")
        ax.legend()
    _save(fig, path)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(config: dict, state: SearchState) -> str:
    settings, evaluator = config["settings"], config["settings"]["evaluator"]
    pattern = (
        f"{evaluator['n']}:{evaluator['m']}" if evaluator["m"] else f"{evaluator['sparsity']:g} unstructured"
    )
    hall = hall_of_fame_entries(state)
    baselines = baseline_entries(state)
    lines = [
        f"# Metric search run `{config['run_id']}`",
        "",
        f"Model `{evaluator['model']}`, sparsity {pattern} (group `{evaluator['group']}`), seed {settings['seed']}, "
        f"{state.generation + 1} of {settings['generations']} generations, population {settings['population']}. "
        f"Fitness: perplexity on {evaluator['fitness_windows']} windows of {evaluator['fitness_seqlen']} tokens "
        f"of `{evaluator['fitness_data']}` after one-shot pruning with statistics from {evaluator['nsamples']} x "
        f"{evaluator['calib_seqlen']} tokens of `{evaluator['calib']}`"
        + (
            f"; the proxy screens candidates and {settings['confirm']} per generation are confirmed by perplexity."
            if settings["multi_fidelity"]
            else "; every candidate is measured by perplexity."
        ),
        "",
        "## Best formulas",
        "",
        _table(
            ["rank", "formula", "ppl (fitness data)", "proxy", "size", "generation"],
            [
                [
                    str(e["rank"]),
                    f"`{e['formula']}`",
                    _fmt(e["ppl"]),
                    _fmt(e["proxy"]),
                    str(e["size"]),
                    str(e["generation"]),
                ]
                for e in hall
            ],
        )
        if hall
        else "No candidate was confirmed by perplexity yet.",
        "",
        "## Baselines on the same fitness data",
        "",
        _table(
            ["metric", "formula", "ppl (fitness data)", "proxy"],
            [
                [name, f"`{e['formula']}`", _fmt(e.get("ppl")), _fmt(e.get("proxy"))]
                for name, e in baselines.items()
            ],
        ),
        "",
    ]
    wanda = _number(baselines.get("wanda", {}).get("ppl"))
    if hall and wanda and _number(hall[0]["ppl"]):
        change = 100.0 * (hall[0]["ppl"] - wanda) / wanda
        verdict = "better than" if change < 0 else "not better than"
        lines += [
            f"The best formula is {verdict} Wanda on the fitness data: ppl {hall[0]['ppl']:.4g} vs "
            f"{wanda:.4g} ({change:+.2f}%). Validate on WikiText-2 test with "
            f"`python -m metric_search validate <run dir>`.",
            "",
        ]
    invalid_totals = {
        r: sum(h.get("invalid", {}).get(r, 0) for h in state.history)
        for r in ("nonfinite", "constant", "error", "timeout")
    }
    lines += [
        "## Generations",
        "",
        _table(
            [
                "gen",
                "best ppl",
                "median ppl",
                "best proxy",
                "median proxy",
                "unique",
                "memo hits",
                "evaluated proxy/ppl",
                "invalid",
                "seconds",
            ],
            [
                [
                    str(h.get("generation")),
                    _fmt(h.get("best_ppl")),
                    _fmt(h.get("median_ppl")),
                    _fmt(h.get("best_proxy")),
                    _fmt(h.get("median_proxy")),
                    str(h.get("unique")),
                    str(h.get("memo_hits")),
                    f"{h.get('evaluated', {}).get('proxy', 0)}/{h.get('evaluated', {}).get('ppl', 0)}",
                    str(sum(h.get("invalid", {}).values())),
                    _fmt(h.get("seconds"), 3),
                ]
                for h in state.history
            ],
        ),
        "",
        "Invalid candidates by reason (whole run): "
        + ", ".join(f"{reason} {count}" for reason, count in invalid_totals.items())
        + ".",
        "",
        f"![fitness per generation]({rundir.FITNESS_PLOT})",
        "",
        f"![fitness vs size]({rundir.PARETO_PLOT})",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path, config: dict, state: SearchState) -> None:
    run_dir = Path(run_dir)
    plot_fitness(state, run_dir / rundir.FITNESS_PLOT)
    plot_pareto(state, run_dir / rundir.PARETO_PLOT)
    rundir.atomic_write_text(run_dir / rundir.REPORT, render_report(config, state))
