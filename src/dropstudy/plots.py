"""Figures: learning curves of a run, the regression fit, and the with/without-dropout comparison.

Each function takes plain values (metric rows, arrays) and writes one PNG; none of them knows
about runs, W&B or configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray")


def _series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and "epoch" in row:
            xs.append(row["epoch"])
            ys.append(value)
    return xs, ys


def _has(rows: Sequence[dict], key: str) -> bool:
    return any(key in row for row in rows)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Train and validation loss (and accuracy where there is one) against epoch."""
    panels = [("loss", "loss")] + ([("acc", "accuracy")] if _has(rows, "train/acc") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        for split, style in (("train", "-"), ("val", "--")):
            xs, ys = _series(rows, f"{split}/{metric}")
            if xs:
                ax.plot(xs, ys, style, marker="o" if len(xs) < 30 else None, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        if metric == "loss" and all(y > 0 for y in _series(rows, "train/loss")[1]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


@dataclass
class FitCurve:
    """One arm's prediction over a dense x grid, and its final errors for the legend."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    train_mse: float
    test_mse: float


def regression_fit(
    train_xy: tuple[Sequence[float], Sequence[float]],
    test_xy: tuple[Sequence[float], Sequence[float]],
    curves: Sequence[FitCurve],
    path: Path,
    title: str,
) -> Path:
    """The classic demo: train points, test points, and each arm's fitted curve over x."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.scatter(*train_xy, s=40, c="magenta", alpha=0.8, label="train", zorder=3)
    ax.scatter(*test_xy, s=40, c="cyan", edgecolors="k", linewidths=0.5, alpha=0.8, label="test", zorder=3)
    for color, curve in zip(COLORS, curves):
        ax.plot(
            curve.x,
            curve.y,
            color=color,
            lw=2,
            label=f"{curve.label}: train MSE {curve.train_mse:.3g}, test MSE {curve.test_mse:.3g}",
        )
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    return _save(fig, path)


def study_curves(arms: dict[str, Sequence[dict]], path: Path, title: str) -> Path:
    """Train (solid) vs validation (dashed) of every arm on shared axes, so overfitting shows
    as the gap opening between an arm's two lines."""
    any_rows = [row for rows in arms.values() for row in rows]
    panels = [("loss", "loss")] + ([("acc", "accuracy")] if _has(any_rows, "train/acc") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.0), squeeze=False, sharex=True)
    for ax, (metric, label) in zip(axes[0], panels):
        for color, (arm, rows) in zip(COLORS, arms.items()):
            for split, style, width, alpha in (("train", "-", 1.0, 0.6), ("val", "--", 2.0, 1.0)):
                xs, ys = _series(rows, f"{split}/{metric}")
                if xs:
                    # Validation on top and bolder: a noisy dropout train curve must not hide it.
                    ax.plot(xs, ys, style, color=color, lw=width, alpha=alpha, zorder=3 if split == "val" else 2,
                            marker="o" if len(xs) < 30 else None, ms=4, label=f"{arm} {split}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        if metric == "loss" and all(y > 0 for y in _series(any_rows, "train/loss")[1]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
