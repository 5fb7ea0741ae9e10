"""Plots people look at: a run's loss and accuracy against round; the benchmark's
cost curves on log-log axes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

# Files are drawn without a display; a notebook keeps its own (inline) backend.
if not os.environ.get("MPLBACKEND") and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from shared import files


def _series(rows: list[dict], section: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(section, {}).get(key) if isinstance(row.get(section), dict) else None
        if value is not None:
            xs.append(int(row["round"]))
            ys.append(float(value))
    return xs, ys


def plot_metrics(rows: list[dict], path: Path, title: str = "") -> None:
    _save(metrics_figure(rows, title), path)


def metrics_figure(rows: list[dict], title: str = "") -> Figure:
    """Loss and accuracy against round, train and held-out."""
    fig = Figure(figsize=(11, 4.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for section, style, label in (
        ("train", "-", "train (sampled clients)"),
        ("eval", "o-", "held-out (all writers)"),
    ):
        xs, ys = _series(rows, section, "loss")
        if xs:
            ax_loss.plot(xs, ys, style, label=label, markersize=4)
        xs, ys = _series(rows, section, "accuracy")
        if xs:
            ax_acc.plot(xs, ys, style, label=label, markersize=4)
    ax_loss.set(xlabel="round", ylabel="loss", title="loss")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_loglog(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> None:
    """One line per series, both axes logarithmic (costs against scale)."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, points in series.items():
        points = sorted((x, y) for x, y in points if x and y and x > 0 and y > 0)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o-", label=label, markersize=4)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    """Writes `fig` to `path` atomically and frees it, whatever happens."""
    try:
        fig.tight_layout()
        with files.atomic_target(path, ".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
