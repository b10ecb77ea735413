"""The readable end of a run: fitness.png (best / median per generation), pareto.png (fitness vs formula
size) and report.md (top formulas, baselines on the same fitness data, per-generation table)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from metric_search import rundir
from metric_search.checkpoint import SearchState
from metric_search.config import TOP_BASELINE_FACTOR
from metric_search.results import baseline_entries, hall_of_fame_entries
from primitives import parse_formula
from primitives.tree import size
from pruning_core import files

FIDELITY_LABELS = {
    "proxy": "proxy (layer reconstruction error)",
    "ppl": "perplexity (base windows)",
    "top": "perplexity (top-rung windows)",
}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _fmt(value, digits: int = 4) -> str:
    value = _number(value)
    return "-" if value is None else f"{value:.{digits}g}"


# The PNG text chunk that holds a digest of the data a plot was drawn from.
DRAWN_FROM = "metric-search-data"


def _drawn_from(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(DRAWN_FROM)
    except (OSError, ValueError):
        return None


def _save(fig, path: Path, digest: str | None) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    # fixed margins (inches) that fit the labels: tight_layout would cost one more full draw per plot
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.25 / width, bottom=0.5 / height, top=1 - 0.35 / height,
                        wspace=0.28)  # fmt: skip
    fig.savefig(buffer, format="png", dpi=100, metadata={DRAWN_FROM: digest} if digest else None)
    plt.close(fig)
    files.atomic_write_bytes(path, buffer.getvalue())


def plot_fitness(state: SearchState, path: Path, digest: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fidelities = [
        f for f in ("top", "ppl", "proxy") if any(_number(h.get(f"best_{f}")) for h in state.history)
    ]
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
    _save(fig, path, digest)


def pareto_front(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points no other point beats in both size and fitness, by increasing size."""
    front, best = [], math.inf
    for nodes, value in sorted(points):
        if value < best:
            front.append((nodes, value))
            best = value
    return front


def plot_pareto(state: SearchState, path: Path, digest: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4), squeeze=False)
    for ax, fidelity in zip(axes[0], ("top", "ppl", "proxy")):
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
    _save(fig, path, digest)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(value, reference) -> str:
    value, reference = _number(value), _number(reference)
    return "-" if value is None or not reference else f"{value / reference:.3f}"


def _held_out_text(final: dict) -> str:
    if "window_indices" not in final:  # final checks of earlier runs read the windows after the search's
        return f"windows {final['first_window']}-{final['first_window'] + final['windows'] - 1}"
    return "windows " + ", ".join(str(i) for i in final["window_indices"])


_WINDOW_TEXT = {"spread": "spread over the corpus", "first": "the first ones"}


# How the top rung prunes, as the report and exported plugins say it (one-shot: nothing to add).
TOP_RUNG_TEXT = {
    "sequential": ", pruned by the sequential driver",
    "one-pass": ", pruned by the sequential driver at one pass per block",
}


def _describe(config: dict) -> str:
    settings, e = config["settings"], config["settings"]["evaluator"]
    top = f"{e['top_windows']} windows" + TOP_RUNG_TEXT.get(e.get("top_rung"), "")
    if settings["promote"] > 1:
        top += f" (in batches of {settings['promote']}: a short one waits for the next generation's)"
    ladder = (
        f"the proxy (layer reconstruction error) screens every new formula, the best {settings['confirm']} per "
        f"generation get perplexity on {e['fitness_windows']} windows, the best {settings['promote']} of those "
        f"climb to {top}"
        if settings["multi_fidelity"]
        else f"every new formula gets perplexity on {e['fitness_windows']} windows, the best "
        f"{settings['promote']} climb to {top}"
    )
    return (
        f"Model `{e['model']}`, settings {', '.join(e['patterns'])} (group `{e['group']}`), seed "
        f"{settings['seed']}, population {settings['population']}. Fitness: the geometric mean over the settings "
        f"of the perplexity on {e['fitness_seqlen']}-token windows of `{e['fitness_data']}` ({_WINDOW_TEXT[e.get('window_order', 'first')]}) after one-shot pruning "
        f"{_update_text(e.get('update', 'none'))}with statistics from {e['nsamples']} x {e['calib_seqlen']} tokens of `{e['calib']}`; {ladder}. "
        "Formulas compare at the highest rung both reached; the hall of fame ranks the top rung first."
    )


def _update_text(update: str) -> str:
    if update == "adaptive":
        return "each mask chosen span by span inside SparseGPT's OBS update (`adaptive`; Wanda's too), "
    return "" if update == "none" else f"each mask followed by the `{update}` weight update (Wanda's too), "


def _final_section(final: dict | None) -> list[str]:
    if not final:
        return ["## Final check", "", "Not run yet (it runs after the last generation).", ""]
    rows = [
        [
            f"`{r['formula']}`",
            *[_fmt(r["ppl"].get(label), 5) for label in final["settings"]],
            f"{r['ratio']:.4f}",
            f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]",
            r["verdict"],
        ]
        for r in final["rows"]
    ]
    header = [
        "formula",
        *[f"ppl {label}" for label in final["settings"]],
        "ratio to Wanda",
        "95% CI",
        "verdict",
    ]
    lines = [
        "## Final check",
        "",
        f"The hall of fame's best {len(final['rows'])} other than Wanda pruned by the sequential driver (the "
        f"protocol a user prunes with), {final['nsamples']} x {final['seqlen']} calibration tokens of "
        f"`{final['calib']}`, perplexity on {final['windows']} windows of `{final['data']}` that the fitness "
        f"never read ({_held_out_text(final)}); "
        f"{_update_text(final.get('update', 'none'))}Wanda: "
        + ", ".join(f"{label} {final['wanda'][label]:.5g}" for label in final["settings"])
        + ". Ratio: exp of the mean over settings of log(ppl / Wanda's ppl); the interval is a paired bootstrap "
        f"over windows ({final['resamples']} resamples). A formula is better than Wanda only when the whole "
        "interval is below 1.",
        "",
        _table(header, rows),
        "",
        f"Chosen: `{final['chosen']['formula']}` ({final['chosen']['verdict']}).",
        "",
    ]
    return lines


RUNGS = ("proxy", "ppl", "top")


def render_report(config: dict, state: SearchState) -> str:
    lines = [
        f"# Metric search run `{config['run_id']}`",
        "",
        f"{state.generation + 1} of {config['settings']['generations']} generations. " + _describe(config),
        "",
        *_best_section(state),
        *_final_section(state.final),
        *_generations_section(state),
    ]
    return "\n".join(lines)


def _best_section(state: SearchState) -> list[str]:
    """The hall of fame and the baselines, on the search's own fitness windows."""
    hall = hall_of_fame_entries(state)
    baselines = baseline_entries(state)
    wanda = baselines.get("wanda", {})
    best = _table(
        ["rank", "formula", "top", "ppl", "proxy", "top / Wanda", "ppl / Wanda", "size", "generation"],
        [
            [
                str(e["rank"]),
                f"`{e['formula']}`",
                *[_fmt(e[f]) for f in reversed(RUNGS)],
                _ratio(e["top"], wanda.get("top")),
                _ratio(e["ppl"], wanda.get("ppl")),
                str(e["size"]),
                str(e["generation"]),
            ]  # fmt: skip
            for e in hall
        ],
    )
    return [
        "## Best formulas",
        "",
        best if hall else "No formula was measured by perplexity yet.",
        "",
        "Ratios to Wanda on the search's own fitness windows are biased toward noise (the best of many "
        "measurements); the final check below is the honest comparison.",
        "",
        "## Baselines on the same fitness data",
        "",
        _table(
            ["metric", "formula", "top", "ppl", "proxy"],
            [
                [name, f"`{e['formula']}`", *[_fmt(e.get(f)) for f in reversed(RUNGS)]]
                for name, e in baselines.items()
            ],
        ),
        "",
        f"A baseline whose base perplexity is over {TOP_BASELINE_FACTOR:g}x Wanda's skips the top rung.",
        "",
    ]


def _generations_section(state: SearchState) -> list[str]:
    """One row per generation, invalid candidates by reason, and the plots."""
    invalid_totals = {}
    for h in state.history:
        for reason, count in h.get("invalid", {}).items():
            invalid_totals[reason] = invalid_totals.get(reason, 0) + count
    header = [
        "gen", "best top", "best ppl", "median ppl", "best proxy", "median proxy", "unique", "memo hits",
        "evaluated proxy/ppl/top", "per minute proxy/ppl/top", "invalid", "seconds",
    ]  # fmt: skip
    rows = [
        [
            str(h.get("generation")),
            _fmt(h.get("best_top")),
            _fmt(h.get("best_ppl")),
            _fmt(h.get("median_ppl")),
            _fmt(h.get("best_proxy")),
            _fmt(h.get("median_proxy")),
            str(h.get("unique")),
            str(h.get("memo_hits")),
            "/".join(str(h.get("evaluated", {}).get(f, 0)) for f in RUNGS),
            "/".join(_fmt(h.get("per_minute", {}).get(f), 3) for f in RUNGS),
            str(sum(h.get("invalid", {}).values())),
            _fmt(h.get("seconds"), 3),
        ]  # fmt: skip
        for h in state.history
    ]
    return [
        "## Generations",
        "",
        _table(header, rows),
        "",
        "Invalid candidates by reason (whole run): "
        + (", ".join(f"{reason} {count}" for reason, count in invalid_totals.items()) or "none")
        + ".",
        "",
        f"![fitness per generation]({rundir.FITNESS_PLOT})",
        "",
        f"![fitness vs size]({rundir.PARETO_PLOT})",
        "",
    ]


def write_report(run_dir: Path, config: dict, state: SearchState) -> None:
    """report.md, and each plot whose data changed since it was drawn: the report is rewritten after every
    generation and after the final check, which changes no plot (drawing both costs ~0.8 s of CPU)."""
    run_dir = Path(run_dir)
    fidelities = list(FIDELITY_LABELS)
    baselines = {
        name: [entry["canonical"], *(entry[f] for f in fidelities)]
        for name, entry in baseline_entries(state).items()
    }
    curves = [[h.get("generation"), *(h.get(f"{stat}_{f}") for stat in ("best", "median") for f in fidelities)]
              for h in state.history]  # fmt: skip
    points = [  # by key: a checkpoint stores the candidates sorted
        [entry["size"], *(entry[f] and entry[f]["fitness"] for f in fidelities)]
        for _, entry in sorted(state.candidates.items())
    ]
    for draw, name, shown in (
        (plot_fitness, rundir.FITNESS_PLOT, [curves, baselines]),
        (plot_pareto, rundir.PARETO_PLOT, [points, baselines]),
    ):
        digest = files.key_digest(shown, 64)
        if _drawn_from(run_dir / name) != digest:
            draw(state, run_dir / name, digest)
    files.atomic_write_text(run_dir / rundir.REPORT, render_report(config, state))
