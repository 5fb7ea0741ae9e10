"""The plot a person looks at after a run: loss and accuracy against round."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
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
        ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with files.atomic_target(path, ".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
