"""Figures: learning curves of a run, the regression fit (with MC-dropout bands), calibration,
and the with/without-dropout comparisons (curves, weight norms).

Each function takes plain values (metric rows, arrays) and writes one PNG; none of them knows
about runs, W&B or configs.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Embedding fonts in a PDF runs fontTools, which logs every glyph it subsets at INFO level.
logging.getLogger("fontTools").setLevel(logging.WARNING)

COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray")


class Drawer:
    """Runs this module's figure functions inline (workers <= 1) or on worker processes.

    A vectorized sweep's members each draw their own figures, about half a second apiece on one
    core; with workers they draw side by side, one per CPU, while the caller goes on. Workers are
    spawned (not forked: the caller holds torch and W&B threads), import only matplotlib, and
    ignore Ctrl-C, which the caller handles."""

    def __init__(self, workers: int = 1):
        self._pool = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))

    def submit(self, fn: Callable[..., Path], *args: Any) -> "Pending":
        if self._pool is not None:
            try:
                return Pending(self._pool.submit(fn, *args), fn, args)
            except BrokenProcessPool:
                pass  # drawn here instead, below
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return Pending(future, fn, args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> "Drawer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Pending:
    """A figure being drawn; `result()` is its path. If the worker processes died (killed, out of
    memory, or a script without an `if __name__ == "__main__":` guard, which spawned workers
    re-run), the figure is drawn here instead: a worker never costs a figure."""

    def __init__(self, future: Future, fn: Callable[..., Path], args: tuple):
        self.future, self.fn, self.args = future, fn, args

    def result(self) -> Path:
        try:
            return self.future.result()
        except BrokenProcessPool:
            return self.fn(*self.args)


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


# Vector copies carry no creation date, so drawing the same numbers twice writes the same file.
_NO_DATE = {".pdf": {"CreationDate": None}, ".svg": {"Date": None}}


def _save(fig: plt.Figure, path: Path, margins: dict[str, float] | None = None,
          vector: bool = False, dpi: int = 110) -> Path:
    """Write the PNG (and, with `vector`, the same figure as PDF and SVG beside it, for a paper).
    `margins` (subplots_adjust fractions) lay out figures whose labels have a known size; that
    skips tight_layout, which measures every label and costs about as much as drawing the figure
    (this matters for a sweep's members, which each draw their own)."""
    if margins is not None:
        fig.subplots_adjust(**margins)
    elif fig.get_layout_engine() is None:  # a constrained layout places itself
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    if vector:
        fig.set_layout_engine("none")  # laid out once for the PNG: the copies keep that layout
        for suffix, metadata in _NO_DATE.items():
            fig.savefig(path.with_suffix(suffix), metadata=metadata)
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
    width = 5.2 * len(panels)
    return _save(fig, path, margins={"left": 0.75 / width, "right": 1 - 0.15 / width, "bottom": 0.13, "top": 0.89,
                                     "wspace": 0.25})


@dataclass
class FitCurve:
    """One arm's prediction over a dense x grid, and its final errors for the legend."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    train_mse: float
    test_mse: float
    # With MC dropout: the mean over the stochastic passes and its standard deviation, per x.
    mc_mean: Sequence[float] | None = None
    mc_std: Sequence[float] | None = None
    mc_samples: int = 0


def regression_fit(
    train_xy: tuple[Sequence[float], Sequence[float]],
    test_xy: tuple[Sequence[float], Sequence[float]],
    curves: Sequence[FitCurve],
    path: Path,
    title: str,
    column: bool = False,
) -> Path:
    """The classic demo: train points, test points, and each arm's fitted curve over x; with MC
    dropout, each arm's band of ±2 predictive standard deviations around its MC mean. `column`:
    the paper version, one column wide, untitled, also as PDF and SVG."""
    if column:
        with plt.rc_context(PAPER_RC):
            return _regression_fit(train_xy, test_xy, curves, path, None, (COLUMN_WIDTH, 2.8), 12, True)
    return _regression_fit(train_xy, test_xy, curves, path, title, (6.4, 4.6), 40, False)


def _regression_fit(train_xy: tuple, test_xy: tuple, curves: Sequence[FitCurve], path: Path, title: str | None,
                    size: tuple[float, float], marker: float, column: bool) -> Path:
    fig, ax = plt.subplots(figsize=size, layout="constrained" if column else None)
    ax.scatter(*train_xy, s=marker, c="magenta", alpha=0.8, label="train", zorder=3)
    ax.scatter(*test_xy, s=marker, c="cyan", edgecolors="k", linewidths=0.5, alpha=0.8, label="test", zorder=3)
    for color, curve in zip(COLORS, curves):
        ax.plot(
            curve.x,
            curve.y,
            color=color,
            lw=1.4 if column else 2,
            label=(f"{curve.label}\nMSE: train {curve.train_mse:.3g}, test {curve.test_mse:.3g}" if column
                   else f"{curve.label}: train MSE {curve.train_mse:.3g}, test MSE {curve.test_mse:.3g}"),
        )
        # An arm that drops nothing has no spread: no band, and no legend entry for one.
        if curve.mc_mean is not None and curve.mc_std is not None and max(curve.mc_std) > 0:
            low = [m - 2 * s for m, s in zip(curve.mc_mean, curve.mc_std)]
            high = [m + 2 * s for m, s in zip(curve.mc_mean, curve.mc_std)]
            ax.fill_between(curve.x, low, high, color=color, alpha=0.18, lw=0,
                            label=f"{curve.label}: MC mean ± 2σ (T={curve.mc_samples})")
    ax.set_xlabel("x (input, unitless)" if column else "x")
    ax.set_ylabel("y (target, unitless)" if column else "y")
    ax.grid(alpha=0.3)
    if column:
        _legend_above(ax, ncols=2)
        return _save(fig, path, vector=True, dpi=PAPER_DPI)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    return _save(fig, path, margins={"left": 0.11, "right": 0.97, "bottom": 0.11, "top": 0.93})


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


def _label(ax: plt.Axes, xlabel: str, ylabel: str, title: str, grid: str = "both") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis=grid)
    ax.legend(fontsize=8)


def calibration(
    reliability: dict[str, Any],
    entropies: dict[str, Sequence[float]],
    path: Path,
    title: str,
) -> Path:
    """Left: reliability diagram, accuracy against confidence per bin for each way of predicting
    (deterministic, MC dropout), with its ECE; the diagonal is perfect calibration. Right: the
    distribution of predictive entropy for each. `reliability` maps a name to its bins: anything
    with `confidence`, `accuracy`, `count` and `ece` (uncertainty.Calibration)."""
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(10.4, 4.2))
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls=":", label="perfectly calibrated")
    for color, (name, bins) in zip(COLORS, reliability.items()):
        points = [(c, a) for c, a, n in zip(bins.confidence, bins.accuracy, bins.count) if n > 0]
        ax.plot([c for c, _ in points], [a for _, a in points], "o-", color=color, ms=4,
                label=f"{name}: ECE {bins.ece:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _label(ax, "confidence (max class probability)", "accuracy", "reliability diagram")
    every = [v for values in entropies.values() for v in values]
    span = (min(every), max(every)) if every else (0.0, 1.0)  # shared bins, so the bars compare
    for color, (name, values) in zip(COLORS, entropies.items()):
        hx.hist(values, bins=30, range=span, color=color, alpha=0.5, label=name)
    _label(hx, "predictive entropy (nats)", "test examples", "predictive entropy")
    fig.suptitle(title)
    return _save(fig, path)


WEIGHT_NORM = "weights/l2/"


def has_weight_norms(arms: dict[str, Sequence[dict]]) -> bool:
    return any(key.startswith(WEIGHT_NORM) for rows in arms.values() for row in rows for key in row)


def weight_norms(arms: dict[str, Sequence[dict]], path: Path, title: str) -> Path:
    """Dropout's shrinking effect on the weights: left, each layer's final L2 norm per arm
    (grouped bars); right, the norm of all weights together over epochs per arm."""
    fig, (bx, lx) = plt.subplots(1, 2, figsize=(11.2, 4.0))
    layers = list(dict.fromkeys(
        key[len(WEIGHT_NORM):] for rows in arms.values() for row in rows for key in row if key.startswith(WEIGHT_NORM)
    ))
    width = 0.8 / max(len(arms), 1)
    for i, (color, (arm, rows)) in enumerate(zip(COLORS, arms.items())):
        last = next((row for row in reversed(rows) if any(k.startswith(WEIGHT_NORM) for k in row)), {})
        bx.bar([j + (i - (len(arms) - 1) / 2) * width for j in range(len(layers))],
               [last.get(WEIGHT_NORM + layer, 0.0) for layer in layers], width, color=color, label=arm)
        epochs, totals = [], []
        for row in rows:
            norms = [v for k, v in row.items() if k.startswith(WEIGHT_NORM)]
            if norms and "epoch" in row:
                epochs.append(row["epoch"])
                totals.append(sum(v * v for v in norms) ** 0.5)
        lx.plot(epochs, totals, color=color, marker="o" if len(epochs) < 30 else None, ms=4, label=arm)
    bx.set_xticks(range(len(layers)), layers, rotation=20, fontsize=8)
    _label(bx, "layer", "L2 norm of the weights", "per layer, at the end", grid="y")
    lx.xaxis.set_major_locator(MaxNLocator(integer=True))
    _label(lx, "epoch", "L2 norm of all weights", "over training")
    fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- reports over seeds

# The report's figures are made for a paper: one column wide (3.4 in, the column of most
# two-column templates), fonts that stay legible at that size, no title (the caption is the
# paper's), PNG for a quick look and W&B, PDF and SVG for the manuscript.
COLUMN_WIDTH = 3.4
PANEL_HEIGHT = 2.3
PAPER_DPI = 200
PAPER_RC = {"font.size": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
            "legend.fontsize": 6.5, "legend.title_fontsize": 6.5, "lines.linewidth": 1.2,
            "lines.markersize": 3.5, "svg.fonttype": "none", "pdf.fonttype": 42}


@dataclass
class SeedStats:
    """One line of a report figure: x positions (epochs or dropout rates), the mean over seeds
    and the half-width of its 95% interval (0 where one seed ran: no bar, no band)."""

    label: str
    x: Sequence[float]
    mean: Sequence[float]
    err: Sequence[float]
    style: str = "-"
    color: str | None = None


def _column_panels(count: int) -> tuple[plt.Figure, Sequence[plt.Axes]]:
    fig, axes = plt.subplots(count, 1, figsize=(COLUMN_WIDTH, 0.6 + PANEL_HEIGHT * count), squeeze=False,
                             sharex=True, layout="constrained")
    return fig, axes[:, 0]


def _legend_above(ax: plt.Axes, ncols: int, title: str | None = None) -> None:
    """The legend in a band above the panel, where it hides no data (a column is too narrow for
    a legend beside it)."""
    handles, labels = ax.get_legend_handles_labels()
    # As many columns as the longest label leaves room for (about 76 characters fit across).
    longest = max((len(line) for label in labels for line in label.splitlines()), default=1)
    ncols = max(1, min(ncols, 76 // (longest + 6)))
    # Row-major order: matplotlib fills legend columns first, which would split pairs apart.
    rows = math.ceil(len(handles) / ncols)
    order = [i * ncols + j for j in range(ncols) for i in range(rows) if i * ncols + j < len(handles)]
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower center",
              bbox_to_anchor=(0.5, 1.01), ncols=ncols, title=title, frameon=False, borderaxespad=0.2)


def _log_if_positive(ax: plt.Axes, lines: Sequence[SeedStats], ylabel: str) -> None:
    # Losses span decades (a train MSE near 0 without dropout, ~0.1 with it): log scale, where it can.
    losses = "loss" in ylabel or "MSE" in ylabel or "entropy" in ylabel
    if losses and all(m > 0 for line in lines for m in line.mean):
        ax.set_yscale("log")


def metric_vs_setting(panels: dict[str, Sequence[SeedStats]], xlabel: str, path: Path, legend_title: str,
                      xticks: Sequence[str] | None = None) -> Path:
    """One panel per quantity (its key is the y-axis label, with units), stacked in one column:
    the mean over seeds of each line (e.g. train, val and test loss) against the dropout rate,
    with error bars of its 95% interval."""
    with plt.rc_context(PAPER_RC):
        fig, axes = _column_panels(len(panels))
        for ax, (ylabel, lines) in zip(axes, panels.items()):
            for i, line in enumerate(lines):
                ax.errorbar(line.x, line.mean, yerr=line.err, fmt=line.style, marker="o", capsize=2.5,
                            color=line.color or COLORS[i % len(COLORS)], label=line.label)
            _log_if_positive(ax, lines, ylabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            _legend_above(ax, ncols=3, title=legend_title)
        if xticks is not None:
            axes[-1].set_xticks(range(len(xticks)), xticks, rotation=20)
        axes[-1].set_xlabel(xlabel)
        return _save(fig, path, vector=True, dpi=PAPER_DPI)


def mean_learning_curves(panels: dict[str, Sequence[SeedStats]], xlabel: str, path: Path,
                         legend_title: str) -> Path:
    """One panel per quantity (key: the y-axis label, with units), stacked in one column: each
    line's mean over seeds against epoch, with a band of its 95% interval."""
    with plt.rc_context(PAPER_RC):
        fig, axes = _column_panels(len(panels))
        for ax, (ylabel, curves) in zip(axes, panels.items()):
            for i, curve in enumerate(curves):
                color = curve.color or COLORS[i % len(COLORS)]
                ax.plot(curve.x, curve.mean, curve.style, color=color, label=curve.label)
                if any(e > 0 for e in curve.err):
                    ax.fill_between(curve.x, [m - e for m, e in zip(curve.mean, curve.err)],
                                    [m + e for m, e in zip(curve.mean, curve.err)], color=color, alpha=0.2, lw=0)
            _log_if_positive(ax, curves, ylabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            _legend_above(ax, ncols=2, title=legend_title)
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[-1].set_xlabel(xlabel)
        return _save(fig, path, vector=True, dpi=PAPER_DPI)
