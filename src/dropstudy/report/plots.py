"""Figures: learning curves of a run, the regression fit (with MC-dropout bands), calibration,
and the with/without-dropout comparisons (curves, weight norms), and the report's figures over seeds.

Each figure has a builder, `<name>_figure(...)`, which takes plain values (metric rows, arrays)
and returns the laid-out Figure without saving it (for a test to inspect, or a page to inline as
SVG through `save_figure`), and a writer, `<name>(..., path, ...)`, which saves it and returns
the path. None of them knows about runs, W&B or configs.

Every loss axis is linear unless its values span more than LOG_DECADES decades (`loss_scale`),
and training and validation losses get a panel each where one axis would squash one of them
(`squashes`). On a log axis an interval over seeds is that of the log values (a geometric mean),
so it never reaches below zero.
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
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dropstudy.report.stats import describe

# Embedding fonts in a PDF runs fontTools, which logs every glyph it subsets at INFO level.
logging.getLogger("fontTools").setLevel(logging.WARNING)

COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray")


class Drawer:
    """Runs this module's figure functions inline (workers <= 1) or on worker processes.

    A batched sweep's members each draw their own figures, about half a second apiece on one
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
        if isinstance(value, (int, float)) and math.isfinite(value) and "epoch" in row:
            xs.append(row["epoch"])
            ys.append(value)
    return xs, ys


def _has(rows: Sequence[dict], key: str) -> bool:
    return any(key in row for row in rows)


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


# --------------------------------------------------------------------------- saving

# Vector copies carry no creation date, so drawing the same numbers twice writes the same file.
_NO_DATE = {".pdf": {"CreationDate": None}, ".svg": {"Date": None}}
# Text stays text in an SVG (searchable, and the page's fonts draw it) and TrueType in a PDF.
_VECTOR_RC = {"svg.fonttype": "none", "pdf.fonttype": 42}


def save_figure(fig: Figure, path: Path) -> Path:
    """Write `fig` to `path` in the format its suffix names (.png at the figure's dpi, .svg, .pdf).
    Every figure here is laid out by matplotlib's constrained layout, so no label is cut."""
    path = Path(path)
    with plt.rc_context(_VECTOR_RC):
        fig.savefig(path, metadata=_NO_DATE.get(path.suffix.lower()))
    return path


def _write(fig: Figure, path: Path, vector: bool = False, svg: bool = False) -> Path:
    """The PNG (and, with `vector`, the same figure as PDF and SVG beside it, for a paper; with
    `svg`, the SVG alone, for report.html); the figure is closed after."""
    try:
        save_figure(fig, path)
        copies = tuple(_NO_DATE) if vector else (".svg",) if svg and path.suffix != ".svg" else ()
        if copies:
            fig.set_layout_engine("none")  # laid out once for the PNG: the copies keep that layout
            for suffix in copies:
                save_figure(fig, path.with_suffix(suffix))
    finally:
        plt.close(fig)
    return path


FIGURE_DPI = 110


def _subplots(panels: int, width: float, height: float, sharex: bool = False) -> tuple[Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False, sharex=sharex,
                             layout="constrained", dpi=FIGURE_DPI)
    return fig, list(axes[0])


# --------------------------------------------------------------------------- value axes

# A loss axis is logarithmic only where its values span more than this many decades: a 3-epoch
# CIFAR-10 loss from 2.3 to 1.7 reads best on a linear axis, a training MSE falling to 1e-12 on a log one.
LOG_DECADES = 2.0


def decades(values: Sequence[float]) -> float:
    """How many powers of ten the positive finite values span."""
    positive = [v for v in _finite(values) if v > 0]
    return math.log10(max(positive) / min(positive)) if positive else 0.0


def loss_scale(values: Sequence[float]) -> str:
    """"log" where the values are all above zero and span more than LOG_DECADES decades, else "linear"."""
    finite = _finite(values)
    return "log" if finite and min(finite) > 0 and decades(finite) > LOG_DECADES else "linear"


def squashes(*groups: Sequence[float]) -> bool:
    """Whether one axis for all the groups (training and validation losses) would squash one of
    them: the axis must be logarithmic and a group spans under a third of its decades (a
    validation MSE near 0.3 above a training MSE falling to 1e-12 would be a line at the top)."""
    together = [v for group in groups for v in _finite(group)]
    if loss_scale(together) == "linear":
        return False
    span = decades(together)
    return any(decades(group) < span / 3 for group in groups if _finite(group))


def _value_axis(ax: plt.Axes, values: Sequence[float], ylabel: str, scaled: bool = True) -> bool:
    """The y axis's label, and its scale as `loss_scale` picks it (linear where not `scaled`,
    e.g. accuracy); True where it is logarithmic."""
    log = scaled and loss_scale(values) == "log"
    ax.set_yscale("log" if log else "linear")
    ax.set_ylabel(ylabel)
    return log


def _epoch_axis(ax: plt.Axes, xlabel: str = "epoch") -> None:
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax: plt.Axes, **kwargs: Any) -> None:
    """A legend where something is labelled (an empty one would only warn)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


# --------------------------------------------------------------------------- learning curves

# The curves of a learning-curve figure as its legend names them, and their line styles: the
# training loss the optimiser saw (dropout on), the training data evaluated in eval mode (dropout
# off; runs before this metric existed lack it), and validation.
SPLITS = {"train": ("train (dropout on)", "-"), "train_eval": ("train (eval mode)", ":"), "val": ("validation", "--")}
RUN_COLORS = {"train": "tab:blue", "train_eval": "tab:blue", "val": "tab:orange"}


@dataclass
class _Panel:
    metric: str  # "loss" or "acc"
    ylabel: str
    splits: tuple[str, ...]


def _loss_unit(rows: Sequence[dict]) -> str:
    classification = any(_has(rows, f"{split}/acc") for split in SPLITS)
    return "cross-entropy (nats)" if classification else "MSE (unitless targets)"


def _curve_panels(runs: Sequence[Sequence[dict]]) -> list[_Panel]:
    """The loss in one panel, or training and validation loss in a panel each where one axis
    would squash one of them; accuracy (where there is one) in another."""
    every = [row for rows in runs for row in rows]
    unit = _loss_unit(every)
    train = [v for rows in runs for split in ("train", "train_eval") for v in _series(rows, f"{split}/loss")[1]]
    val = [v for rows in runs for v in _series(rows, "val/loss")[1]]
    if squashes(train, val):
        panels = [_Panel("loss", f"training {unit}", ("train", "train_eval")),
                  _Panel("loss", f"validation {unit}", ("val",))]
    else:
        panels = [_Panel("loss", unit, tuple(SPLITS))]
    if any(_has(every, f"{split}/acc") for split in SPLITS):
        panels.append(_Panel("acc", "accuracy (%)", tuple(SPLITS)))
    return panels


def _plot_split(ax: plt.Axes, rows: Sequence[dict], metric: str, split: str, color: str, label: str,
                **style: Any) -> list[float]:
    """One curve, with markers where it has few points (one point is a marker alone); returns
    the values drawn."""
    xs, ys = _series(rows, f"{split}/{metric}")
    if metric == "acc":
        ys = [100 * y for y in ys]
    if xs:
        ax.plot(xs, ys, SPLITS[split][1], color=color, marker="o" if len(xs) < 30 else None, label=label,
                **{"ms": 3, **style})
    return ys


def learning_curves_figure(rows: Sequence[dict], title: str) -> Figure:
    """A run's training (dropout on, and in eval mode where logged) and validation loss, and
    accuracy where there is one, against epoch."""
    panels = _curve_panels([rows])
    fig, axes = _subplots(len(panels), 4.8, 3.7, sharex=True)  # validation every few epochs: the same epochs
    for ax, panel in zip(axes, panels):
        values = [v for split in panel.splits
                  for v in _plot_split(ax, rows, panel.metric, split, RUN_COLORS[split], SPLITS[split][0])]
        _value_axis(ax, values, panel.ylabel, scaled=panel.metric == "loss")
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8)
    fig.suptitle(title)
    return fig


def learning_curves(rows: Sequence[dict], path: Path, title: str) -> Path:
    return _write(learning_curves_figure(rows, title), path)


def study_curves_figure(arms: dict[str, Sequence[dict]], title: str) -> Figure:
    """Every arm's training and validation curves, a colour per arm, so overfitting shows as the
    gap opening between an arm's lines; each arm's best validation epoch is starred."""
    panels = _curve_panels(list(arms.values()))
    fig, axes = _subplots(len(panels), 5.4, 4.2, sharex=True)
    for ax, panel in zip(axes, panels):
        values = []
        for color, (arm, rows) in zip(COLORS, arms.items()):
            for split in panel.splits:
                # Validation on top and bolder: a noisy dropout train curve must not hide it.
                style = {"lw": 2.0, "zorder": 3} if split == "val" else {"lw": 1.0, "alpha": 0.7, "zorder": 2}
                values += _plot_split(ax, rows, panel.metric, split, color, f"{arm}: {SPLITS[split][0]}",
                                      ms=4, **style)
        _value_axis(ax, values, panel.ylabel, scaled=panel.metric == "loss")
        if panel.metric == "loss" and "val" in panel.splits:
            _mark_best(ax, arms)
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
    fig.suptitle(title)
    return fig


def _mark_best(ax: plt.Axes, arms: dict[str, Sequence[dict]]) -> None:
    """Each arm's lowest validation loss: a star, and its epoch written beside it (toward the
    middle of the panel, so the words stay inside it)."""
    middle = sum(ax.get_xlim()) / 2
    for i, (color, rows) in enumerate(zip(COLORS, arms.values())):
        xs, ys = _series(rows, "val/loss")
        if not xs:
            continue
        best = min(range(len(ys)), key=ys.__getitem__)
        ax.plot(xs[best], ys[best], "*", color=color, ms=13, mec="k", mew=0.6, zorder=5, label="_best")
        right = xs[best] > middle
        ax.annotate(f"best val: epoch {xs[best]:g}", (xs[best], ys[best]), xytext=(-8 if right else 8, 6 + 11 * i),
                    textcoords="offset points", ha="right" if right else "left", fontsize=7, color=color,
                    zorder=5, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})


def study_curves(arms: dict[str, Sequence[dict]], path: Path, title: str, svg: bool = False) -> Path:
    return _write(study_curves_figure(arms, title), path, svg=svg)


# --------------------------------------------------------------------------- the regression fit


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


def regression_fit_figure(
    train_xy: tuple[Sequence[float], Sequence[float]],
    test_xy: tuple[Sequence[float], Sequence[float]],
    curves: Sequence[FitCurve],
    title: str,
    column: bool = False,
) -> Figure:
    """The classic demo: train points, test points, and each arm's fitted curve over x; with MC
    dropout, each arm's band of ±2 predictive standard deviations around its MC mean. `column`:
    the paper version, one column wide and untitled."""
    if column:
        with plt.rc_context(PAPER_RC):
            fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.8), layout="constrained", dpi=PAPER_DPI)
            _fit(ax, train_xy, test_xy, curves, 12, True)
            _paper_ticks(ax)
            _legend_above(ax, ncols=2)
        return fig
    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained", dpi=FIGURE_DPI)
    _fit(ax, train_xy, test_xy, curves, 40, False)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    return fig


def _fit(ax: plt.Axes, train_xy: tuple, test_xy: tuple, curves: Sequence[FitCurve], marker: float,
         column: bool) -> None:
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
    ax.set_xlabel("x (input, unitless)")
    ax.set_ylabel("y (target, unitless)")
    ax.grid(alpha=0.3)


def regression_fit(
    train_xy: tuple[Sequence[float], Sequence[float]],
    test_xy: tuple[Sequence[float], Sequence[float]],
    curves: Sequence[FitCurve],
    path: Path,
    title: str,
    column: bool = False,
    svg: bool = False,
) -> Path:
    """`regression_fit_figure` as PNG; with `column`, also as PDF and SVG, for a paper; with
    `svg`, also as SVG."""
    fig = regression_fit_figure(train_xy, test_xy, curves, title, column)
    if column:
        with plt.rc_context(PAPER_RC):
            return _write(fig, path, vector=True)
    return _write(fig, path, svg=svg)


# --------------------------------------------------------------------------- calibration


def _label(ax: plt.Axes, xlabel: str, ylabel: str, title: str, grid: str = "both") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis=grid)
    _legend(ax, fontsize=8)


def calibration_figure(reliability: dict[str, Any], entropies: dict[str, Sequence[float]], title: str) -> Figure:
    """Left: reliability diagram, accuracy against confidence per bin for each way of predicting
    (deterministic, MC dropout), with its ECE; the diagonal is perfect calibration. Below it, how
    many test predictions fall in each bin (a point on few predictions says little). Right: the
    distribution of predictive entropy for each. `reliability` maps a name to its bins: anything
    with `confidence`, `accuracy`, `count` and `ece` (uncertainty.Calibration)."""
    fig = plt.figure(figsize=(10.4, 5.6), layout="constrained", dpi=FIGURE_DPI)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.3])
    ax = fig.add_subplot(grid[0, 0])
    hx = fig.add_subplot(grid[:, 1])
    cx = fig.add_subplot(grid[1, 0], sharex=ax)
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls=":", label="perfectly calibrated")
    for color, (name, bins) in zip(COLORS, reliability.items()):
        points = [(c, a) for c, a, n in zip(bins.confidence, bins.accuracy, bins.count) if n > 0]
        ax.plot([c for c, _ in points], [a for _, a in points], "o-", color=color, ms=4,
                label=f"{name}: ECE {bins.ece:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _label(ax, "", "accuracy (fraction correct)", "reliability diagram")
    ax.tick_params(labelbottom=False)
    _bin_counts(cx, reliability)
    every = [v for values in entropies.values() for v in values]
    span = (min(every), max(every)) if every else (0.0, 1.0)  # shared bins, so the bars compare
    for color, (name, values) in zip(COLORS, entropies.items()):
        hx.hist(values, bins=30, range=span, color=color, alpha=0.5, label=name)
    _label(hx, "predictive entropy (nats)", "test examples", "predictive entropy")
    fig.suptitle(title)
    return fig


def _bin_counts(cx: plt.Axes, reliability: dict[str, Any]) -> None:
    """Side-by-side bars of each way's predictions per confidence bin, each with its count."""
    width = 1 / max(len(b.count) for b in reliability.values()) / max(len(reliability), 1)
    top = 0
    for i, (color, (name, bins)) in enumerate(zip(COLORS, reliability.items())):
        n = len(bins.count)
        xs = [(j + 0.5) / n + (i - (len(reliability) - 1) / 2) * width for j in range(n)]
        cx.bar(xs, bins.count, width, color=color, alpha=0.8, label=name)
        for x, count in zip(xs, bins.count):
            if count > 0:
                cx.annotate(f"{count:g}", (x, count), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", rotation=90, fontsize=6)
        top = max(top, *bins.count)
    cx.set_ylim(0, max(top, 1) * 1.6)  # room for the counts written above the bars
    cx.set_xlim(0, 1)
    cx.set_xlabel("confidence (max class probability)")
    cx.set_ylabel("predictions")
    cx.grid(alpha=0.3, axis="y")


def calibration(
    reliability: dict[str, Any],
    entropies: dict[str, Sequence[float]],
    path: Path,
    title: str,
) -> Path:
    return _write(calibration_figure(reliability, entropies, title), path)


# --------------------------------------------------------------------------- weight norms

WEIGHT_NORM = "weights/l2/"


def has_weight_norms(arms: dict[str, Sequence[dict]]) -> bool:
    return any(key.startswith(WEIGHT_NORM) for rows in arms.values() for row in rows for key in row)


def weight_norms_figure(arms: dict[str, Sequence[dict]], title: str) -> Figure:
    """Dropout's shrinking effect on the weights: left, each layer's final L2 norm per arm
    (grouped bars); right, the norm of all weights together over epochs per arm. Both axes
    start at 0, so the arms' norms compare by their size."""
    fig, (bx, lx) = _subplots(2, 5.6, 4.0)
    layers = list(dict.fromkeys(
        key[len(WEIGHT_NORM):] for rows in arms.values() for row in rows for key in row if key.startswith(WEIGHT_NORM)
    ))
    width = 0.8 / max(len(arms), 1)
    highest = 0.0
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
        if epochs:
            lx.plot(epochs, totals, color=color, marker="o" if len(epochs) < 30 else None, ms=4, label=arm)
            highest = max(highest, *totals)
    bx.set_xticks(range(len(layers)), layers, rotation=20, fontsize=8)
    _label(bx, "layer", "L2 norm of the weights", "per layer, at the end", grid="y")
    _epoch_axis(lx)
    _label(lx, "epoch", "L2 norm of all weights", "over training")
    bx.set_ylim(bottom=0)
    lx.set_ylim(0, 1.1 * highest or 1.0)
    fig.suptitle(title)
    return fig


def weight_norms(arms: dict[str, Sequence[dict]], path: Path, title: str, svg: bool = False) -> Path:
    return _write(weight_norms_figure(arms, title), path, svg=svg)


# --------------------------------------------------------------------------- reports over seeds

# The report's figures are made for a paper: one column wide (3.4 in, the column of most
# two-column templates), fonts that stay legible at that size, no title (the caption is the
# paper's), PNG for a quick look and W&B, PDF and SVG for the manuscript.
COLUMN_WIDTH = 3.4
PANEL_HEIGHT = 2.3
PAPER_DPI = 200
PAPER_RC = {"font.size": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
            "legend.fontsize": 6.5, "legend.title_fontsize": 6.5, "lines.linewidth": 1.2,
            "lines.markersize": 3.5, **_VECTOR_RC}


@dataclass
class SeedStats:
    """One line of a report figure: x positions (epochs or dropout rates) and, at each, the
    values of the seeds (one value: no interval there)."""

    label: str
    x: Sequence[float]
    samples: Sequence[Sequence[float]]
    style: str = "-"
    color: str | None = None


def seed_interval(values: Sequence[float], log: bool) -> tuple[float, float, float]:
    """The centre of a line and its 95% interval over the seeds' values: the mean and the t
    interval of the mean; for a log axis, the geometric mean and the t interval of the log
    values, taken back (it stays above 0, where a log axis can draw it). The bounds are nan
    where fewer than two seeds have a value."""

    finite = _finite(values)
    if log:
        s = describe([math.log(v) for v in finite if v > 0])
        return math.exp(s.mean), math.exp(s.low), math.exp(s.high)
    s = describe(finite)
    return s.mean, s.low, s.high


def interval_note(log: bool, seeds: str, intervals: bool = True) -> str:
    """What a report panel's centres and intervals are, for its legend title."""
    centre = "geometric mean" if log else "mean"
    if not intervals:  # one seed a point
        return f"{centre} ({seeds})"
    return f"{centre}, 95% CI of log values ({seeds})" if log else f"{centre}, 95% CI ({seeds})"


def _column_panels(count: int) -> tuple[Figure, Sequence[plt.Axes]]:
    fig, axes = plt.subplots(count, 1, figsize=(COLUMN_WIDTH, 0.6 + PANEL_HEIGHT * count), squeeze=False,
                             sharex=True, layout="constrained", dpi=PAPER_DPI)
    return fig, axes[:, 0]


def _paper_ticks(ax: plt.Axes) -> None:
    # Ticks made when the figure is drawn (outside the paper style's context) keep its sizes.
    ax.tick_params(axis="x", which="both", labelsize=PAPER_RC["xtick.labelsize"])
    ax.tick_params(axis="y", which="both", labelsize=PAPER_RC["ytick.labelsize"])


def _legend_above(ax: plt.Axes, ncols: int, title: str | None = None) -> None:
    """The legend in a band above the panel, where it hides no data (a column is too narrow for
    a legend beside it)."""
    handles, labels = ax.get_legend_handles_labels()
    # As many columns as the longest label leaves room for (about 70 characters fit across).
    longest = max((len(line) for label in labels for line in label.splitlines()), default=1)
    ncols = max(1, min(ncols, 70 // (longest + 6)))
    # Row-major order: matplotlib fills legend columns first, which would split pairs apart.
    rows = math.ceil(len(handles) / ncols)
    order = [i * ncols + j for j in range(ncols) for i in range(rows) if i * ncols + j < len(handles)]
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower center",
              bbox_to_anchor=(0.5, 1.01), ncols=ncols, title=title, frameon=False, borderaxespad=0.2)


def _seed_axis(ax: plt.Axes, ylabel: str, lines: Sequence[SeedStats]) -> bool:
    """Label and scale a report panel (accuracy stays linear); True where it is logarithmic."""
    return _value_axis(ax, [v for line in lines for values in line.samples for v in values], ylabel,
                       scaled="accuracy" not in ylabel)


def metric_vs_setting_figure(panels: dict[str, Sequence[SeedStats]], xlabel: str, seeds: str,
                             xticks: Sequence[str] | None = None) -> Figure:
    """One panel per quantity (its key is the y-axis label, with units), stacked in one column:
    the centre over seeds of each line (e.g. train, val and test loss) against the dropout rate,
    with error bars of its 95% interval (`seed_interval`; the legend title says which)."""
    with plt.rc_context(PAPER_RC):
        fig, axes = _column_panels(len(panels))
        for ax, (ylabel, lines) in zip(axes, panels.items()):
            log = _seed_axis(ax, ylabel, lines)
            intervals = False
            for i, line in enumerate(lines):
                centre, low, high = zip(*(seed_interval(values, log) for values in line.samples))
                below = [c - lo if math.isfinite(lo) else 0.0 for c, lo in zip(centre, low)]
                above = [hi - c if math.isfinite(hi) else 0.0 for c, hi in zip(centre, high)]
                intervals = intervals or any(math.isfinite(v) for v in low)
                ax.errorbar(line.x, centre, yerr=[below, above], fmt=line.style, marker="o", capsize=2.5,
                            color=line.color or COLORS[i % len(COLORS)], label=line.label)
            ax.grid(alpha=0.3)
            _paper_ticks(ax)
            _legend_above(ax, ncols=3, title=interval_note(log, seeds, intervals))
        if xticks is not None:
            axes[-1].set_xticks(range(len(xticks)), xticks, rotation=20)
        axes[-1].set_xlabel(xlabel)
    return fig


def metric_vs_setting(panels: dict[str, Sequence[SeedStats]], xlabel: str, path: Path, seeds: str,
                      xticks: Sequence[str] | None = None) -> Path:
    with plt.rc_context(PAPER_RC):
        return _write(metric_vs_setting_figure(panels, xlabel, seeds, xticks), path, vector=True)


def mean_learning_curves_figure(panels: dict[str, Sequence[SeedStats]], xlabel: str, seeds: str) -> Figure:
    """One panel per quantity (key: the y-axis label, with units), stacked in one column: each
    line's centre over seeds against epoch, with a band of its 95% interval (`seed_interval`;
    the legend title says which). A line of one point is a marker."""
    with plt.rc_context(PAPER_RC):
        fig, axes = _column_panels(len(panels))
        for ax, (ylabel, curves) in zip(axes, panels.items()):
            log = _seed_axis(ax, ylabel, curves)
            intervals = False
            for i, curve in enumerate(curves):
                color = curve.color or COLORS[i % len(COLORS)]
                centre, low, high = zip(*(seed_interval(values, log) for values in curve.samples))
                ax.plot(curve.x, centre, curve.style, color=color, marker="o" if len(curve.x) < 2 else None,
                        label=curve.label)
                if any(math.isfinite(v) for v in low):
                    ax.fill_between(curve.x, low, high, color=color, alpha=0.2, lw=0)
                    intervals = True
            ax.grid(alpha=0.3)
            _paper_ticks(ax)
            _legend_above(ax, ncols=2, title=interval_note(log, seeds, intervals))
        axes[-1].xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # "1750" and "2000" fit apart
        axes[-1].set_xlabel(xlabel)
    return fig


def mean_learning_curves(panels: dict[str, Sequence[SeedStats]], xlabel: str, path: Path, seeds: str) -> Path:
    """As PNG, PDF and SVG; given a .svg path, as SVG alone."""
    with plt.rc_context(PAPER_RC):
        return _write(mean_learning_curves_figure(panels, xlabel, seeds), path, vector=path.suffix != ".svg")
