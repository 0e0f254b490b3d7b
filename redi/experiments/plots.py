"""PNG plots of training metrics: one line per run, labelled axes, a legend. Used by the demo and `redi compare`.

Every function takes ``runs``: a mapping from a run's label (the legend entry) to its metrics records, the
dicts of ``metrics.jsonl`` (or any dicts holding ``step`` and the plotted key). Callers choose which records
to pass (e.g. only stage 2's); records without the key, or with a null value, are skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or over ssh
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Runs = Mapping[str, Sequence[dict]]


def _usable(r: dict, key: str, x: str, positive: bool) -> bool:
    value = r.get(key)
    # On a log axis a zero (the first step's update at warmup lr 0) cannot be drawn; it is left out.
    return value is not None and r.get(x) is not None and (value > 0 or not positive)


def _points(records: Sequence[dict], key: str, x: str, positive: bool = False) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[key]) for r in records if _usable(r, key, x, positive)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _label(ax, *, xlabel: str, ylabel: str, title: str, logy: bool = False, title_size: str = "large",
           nonnegative: bool = False) -> None:
    """Axes, title, grid, legend. Steps are whole numbers, so the x ticks are too; ``nonnegative`` (an accuracy)
    keeps the y axis from showing ticks below 0 when every value is 0."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if nonnegative and not logy:
        low, high = ax.get_ylim()
        ax.set_ylim(max(0.0, low), high if high > 0 else 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=title_size)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, logy: bool, nonnegative: bool = False) -> Path:
    _label(ax, xlabel=xlabel, ylabel=ylabel, title=title, logy=logy, nonnegative=nonnegative)
    return _save(fig, path)


def plot_metric(runs: Runs, key: str, path: str | Path, *, ylabel: str, title: str = "", x: str = "step",
                xlabel: str = "optimizer step", logy: bool = False, err_key: str | None = None,
                zoom_without: frozenset[str] = frozenset(), nonnegative: bool = False) -> Path:
    """One line per run of ``key`` against ``x``; ``err_key`` (e.g. an accuracy's SEM) draws error bars.

    ``zoom_without``: runs (e.g. collapsed ones) that may stretch the axis so far that the others become one
    line. When they do, a second panel repeats the plot without them.
    """
    def draw(ax, skip: frozenset[str]) -> None:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (label, records) in enumerate(runs.items()):
            xs, ys = _points(records, key, x, positive=logy)
            if not xs or label in skip:
                continue
            colour = colours[i % len(colours)]  # the same colour for a run in both panels
            if err_key:
                errs = [r.get(err_key) or 0.0 for r in records if _usable(r, key, x, logy)]
                ax.errorbar(xs, ys, yerr=errs, label=label, color=colour, marker="o", markersize=3, capsize=2)
            else:
                ax.plot(xs, ys, label=label, color=colour, linewidth=1.2)

    kept = [y for label, records in runs.items() if label not in zoom_without for y in _points(records, key, x, logy)[1]]
    every = [y for records in runs.values() for y in _points(records, key, x, logy)[1]]
    span = (max(every) - min(every)) if every else 0.0
    zoom = bool(zoom_without and kept and not logy and span > 0 and (max(kept) - min(kept)) < span / 4)
    if not zoom:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        draw(ax, frozenset())
        return _finish(fig, ax, Path(path), xlabel=xlabel, ylabel=ylabel, title=title, logy=logy,
                       nonnegative=nonnegative)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    draw(ax, frozenset())
    draw(ax2, zoom_without)
    for a, t in ((ax, title + " (all arms)"), (ax2, f"without {', '.join(sorted(zoom_without))} (zoom)")):
        _label(a, xlabel=xlabel, ylabel=ylabel, title=t, title_size="medium", nonnegative=nonnegative)
    return _save(fig, Path(path))


def plot_logps(runs: Runs, path: str | Path, *, title: str = "Normalised log-prob (LogPS) of the pairs") -> Path:
    """Chosen (solid) and rejected (dashed) per-token mean log-prob, one colour per run (the paper's LogPS)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        for key, style, what in (("logps/chosen_normalized", "-", "chosen"),
                                 ("logps/rejected_normalized", "--", "rejected")):
            xs, ys = _points(records, key, "step")
            if xs:
                ax.plot(xs, ys, style, color=colour, label=f"{label}: {what}", linewidth=1.2)
    return _finish(fig, ax, Path(path), xlabel="optimizer step", ylabel="log-prob per token (nats)",
                   title=title, logy=False)


def plot_training_curves(runs: Runs, out_dir: str | Path, *, prefix: str = "", title_suffix: str = "") -> list[Path]:
    """The three standard plots: loss, chosen/rejected LogPS and update norm (log scale) against step."""
    out = Path(out_dir)
    suffix = f" ({title_suffix})" if title_suffix else ""
    return [
        plot_metric(runs, "loss", out / f"{prefix}loss.png", ylabel="training loss (each run's own objective)",
                    title=f"Loss{suffix}"),
        plot_logps(runs, out / f"{prefix}logps.png", title=f"Normalised log-prob (LogPS){suffix}"),
        plot_metric(runs, "update_norm", out / f"{prefix}update_norm.png", logy=True,
                    ylabel="‖Δθ‖ of the step (log scale)", title=f"Update norm{suffix}"),
    ]
