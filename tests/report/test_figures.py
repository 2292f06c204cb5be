"""Every figure dropstudy makes, read off the Figure itself: the runs' (regression and CIFAR-10),
a study's, a sweep report's and the demos', drawn by the real commands on tiny runs in this
process. No text leaves the canvas, every legend entry names something drawn, a loss axis is
logarithmic only where the values span decades, and an interval on a log axis stays above its
floor."""

from __future__ import annotations

import math
import os
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from conftest import read_jsonl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import Collection, PathCollection
from matplotlib.container import Container
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.report import plots

QUICK = ["trainer.epochs=30", "trainer.eval_every=5", "tracker.mode=disabled"]
# Validated only at the end, as a long regression run may be: one validation point a run.
ONE_VALIDATION = ["trainer.epochs=30", "trainer.eval_every=30", "tracker.mode=disabled"]
CIFAR = ["experiment=cifar10", "data.synthetic=true", "data.subset=256", "trainer.epochs=2", "data.val_size=40",
         "trainer.batch_size=32", "eval.mc_samples=3", "tracker.mode=disabled"]
DEMOS = ("scaling", "masks", "equivalence")


def invoke(*args: str) -> None:
    result = CliRunner().invoke(app, list(args), prog_name="dropstudy")
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Path, Figure]]:
    """The tool's figures, by the path each was saved to (its PNG, PDF and SVG copies name the
    same Figure): a regression study (its arms are runs), a CIFAR-10 run with MC dropout, a 2x2
    sweep and its report, and every demo; all in one folder."""
    tmp = tmp_path_factory.mktemp("figures")
    saved: dict[Path, Figure] = {}
    save_figure = plots.save_figure

    def recording(fig: Figure, path: Path) -> Path:
        saved[Path(path).resolve()] = fig
        return save_figure(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("WANDB_")]:
            mp.delenv(key)
        mp.setenv("HOME", str(tmp / "home"))
        mp.setenv("DROPSTUDY_DATA", str(tmp / "data"))
        mp.chdir(tmp)
        mp.setattr(plots, "save_figure", recording)
        invoke("study", *QUICK, "eval.mc_samples=5", "hydra.run.dir=study")
        invoke("train", *CIFAR, "hydra.run.dir=cifar")
        invoke("sweep", *ONE_VALIDATION, "model.dropout=0,0.5", "seed=0,1", "hydra.sweep.dir=sw")
        invoke("report", "sw")
        for name in DEMOS:
            invoke("demo", name, "--out", "demo")
    return tmp.resolve(), saved


def figures(made: tuple[Path, dict[Path, Figure]]) -> dict[str, Figure]:
    """Each figure once, named by its path under the test folder (report.html's figures are drawn
    in a temporary folder, then inlined)."""
    root, saved = made
    named: dict[int, str] = {}
    for path, fig in sorted(saved.items(), key=lambda item: (item[0].suffix != ".png", item[0])):
        named.setdefault(id(fig), str(path.relative_to(root)) if root in path.parents else str(path))
    return {name: next(f for f in saved.values() if id(f) == key) for key, name in named.items()}


def test_every_figure_the_tool_writes_is_drawn_here(made):
    root, saved = made
    written = {p.resolve() for p in root.rglob("*") if p.suffix in (".png", ".pdf", ".svg") and "data" not in p.parts}
    assert written == {p for p in saved if root in p.parents}, "every figure file goes through plots.save_figure"
    names = {str(p.relative_to(root)) for p in saved if root in p.parents}
    expected = {"study/plots/study_curves.png", "study/plots/weight_norms.png", "study/plots/regression_fit.png",
                "study/dropout-0/plots/learning_curves.png", "study/dropout-0.5/plots/regression_fit.png",
                "cifar/plots/learning_curves.png", "cifar/plots/calibration.png", "sw/0/plots/learning_curves.png",
                *(f"sw/report/regression_{name}.{ext}" for name in ("vs_dropout", "learning_curves", "fit")
                  for ext in ("png", "pdf", "svg")),
                *(f"demo/{name}.png" for name in DEMOS)}
    assert expected <= names, sorted(expected - names)


def drawn_texts(fig: Figure) -> list[tuple[str, object]]:
    """The text a draw of `fig` puts on its canvas (tick labels, axis labels, titles, legends,
    annotations), each with where it landed in pixels."""
    drawn = []
    draw = Text.draw

    def recording(self: Text, renderer) -> None:
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    with patch.object(Text, "draw", recording):
        FigureCanvasAgg(fig).draw()  # a closed figure's own canvas no longer draws
    return drawn


def test_no_text_leaves_the_canvas(made):
    outside = []
    for name, fig in figures(made).items():
        texts = drawn_texts(fig)
        assert texts, name
        width, height = fig.bbox.width, fig.bbox.height
        outside += [(name, text, tuple(round(v) for v in box.extents)) for text, box in texts
                    if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5]
    assert not outside


def _shows_data(artist: object) -> bool:
    """Whether `artist` puts at least one finite point on the axes: a line of two points, or a
    marker; a bar of some height; a scatter point; a band of some area."""
    if isinstance(artist, Line2D):
        xy = np.asarray(artist.get_xydata(), dtype=float)
        points = int(np.isfinite(xy).all(axis=1).sum()) if xy.size else 0
        marker = artist.get_marker() not in (None, "", " ", "None", "none")
        line = artist.get_linestyle() not in ("", " ", "None", "none")
        return (line and points >= 2) or (marker and points >= 1)
    if isinstance(artist, Container):
        return any(_shows_data(child) for child in artist.get_children())
    if isinstance(artist, Rectangle):
        return math.isfinite(artist.get_height()) and artist.get_height() != 0
    if isinstance(artist, PathCollection):
        offsets = np.asarray(artist.get_offsets(), dtype=float)
        return bool(offsets.size) and bool(np.isfinite(offsets).all(axis=1).any())
    if isinstance(artist, Collection):
        for path in artist.get_paths():
            v = path.vertices
            if len(v) >= 3 and np.isfinite(v).all() and np.ptp(v[:, 0]) > 0 and np.ptp(v[:, 1]) > 0:
                return True
        return False
    return False


def test_every_legend_entry_names_something_drawn(made):
    empty = []
    for name, fig in figures(made).items():
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            artists = [*ax.lines, *ax.collections, *ax.patches, *ax.containers]
            for text in legend.get_texts():
                label = text.get_text()
                # A histogram's label is on its first bar, which may be empty: it names all its bars.
                named = [next((c for c in ax.containers if a in c), a) for a in artists if a.get_label() == label]
                if not any(_shows_data(a) for a in named):
                    empty.append((name, label))
    assert not empty


def test_short_losses_get_linear_axes_and_the_study_stars_each_best_epoch(made):
    by_name = figures(made)
    cifar_loss = by_name["cifar/plots/learning_curves.png"].axes[0]
    assert cifar_loss.get_yscale() == "linear" and cifar_loss.get_ylabel() == "cross-entropy (nats)"
    assert by_name["cifar/plots/learning_curves.png"].axes[1].get_ylabel() == "accuracy (%)"
    root, _ = made
    study = by_name["study/plots/study_curves.png"]
    (loss,) = [ax for ax in study.axes if any("validation" in line.get_label() for line in ax.lines)]
    notes = sorted(t.get_text() for t in loss.texts)
    best = []
    for arm in ("dropout-0", "dropout-0.5"):
        epochs, values = zip(*((r["epoch"], r["val/loss"]) for r in read_jsonl(root / "study" / arm / "metrics.jsonl")
                               if "val/loss" in r))
        best.append(f"best val: epoch {epochs[int(np.argmin(values))]}")
    assert notes == sorted(best)
    norms = by_name["study/plots/weight_norms.png"]
    assert [ax.get_ylim()[0] for ax in norms.axes] == [0, 0], "weight norms compare from 0"


def test_calibration_counts_every_prediction_in_its_bin(made):
    diagram, entropies, counts = figures(made)["cifar/plots/calibration.png"].axes
    assert counts.get_ylabel() == "predictions"
    per_way = [sum(bar.get_height() for bar in bars) for bars in counts.containers]
    examples = [sum(bar.get_height() for bar in bars) for bars in entropies.containers]
    assert len(per_way) == 2 and per_way == examples, "each way's bins hold every test prediction once"
    written = sorted(float(t.get_text()) for t in counts.texts)
    assert written == sorted(bar.get_height() for bars in counts.containers for bar in bars if bar.get_height() > 0)


def train_mse(epochs: int) -> list[float]:
    """A training MSE falling from 0.5 by a decade every 2 epochs (no dropout, full batch)."""
    return [0.5 * 10 ** (-e / 2) for e in range(1, epochs + 1)]


def test_losses_that_span_decades_go_log_and_validation_gets_its_own_panel(made):
    root, _ = made
    rows = read_jsonl(root / "study" / "dropout-0" / "metrics.jsonl")
    # The run's own validation losses, under a training loss that falls 12 decades, and the
    # eval-mode training loss (logged by newer runs) beside it.
    for row, value in zip(rows, train_mse(len(rows))):
        row["train/loss"], row["train_eval/loss"] = value, value / 2
    fig = plots.learning_curves_figure(rows, "decades")
    train, val = fig.axes
    assert train.get_ylabel() == "training MSE (unitless targets)" and train.get_yscale() == "log"
    assert val.get_ylabel() == "validation MSE (unitless targets)" and val.get_yscale() == "linear"
    assert {line.get_label(): line.get_linestyle() for line in train.lines} == {
        "train (dropout on)": "-", "train (eval mode)": ":"}
    plots.plt.close(fig)
    assert not plots.squashes([2.3, 2.0, 1.7], [2.2, 2.1, 1.9]), "a short CIFAR-10 loss keeps one linear axis"


@pytest.mark.parametrize("kind", ["band", "bar"])
def test_an_interval_on_a_log_axis_stays_above_its_floor(kind):
    """Three seeds whose losses differ by decades: the arithmetic t interval's lower end is
    far below 0; the log-value interval is drawn, above the axis floor, and the legend says so."""
    seeds = [1e-6, 1e-3, 0.3]
    xs = [10, 20, 30, 40]
    lines = [plots.SeedStats("dropout=0, train", xs, [[s * 10 ** -i for s in seeds] for i in range(len(xs))]),
             plots.SeedStats("dropout=0, val", xs, [[0.3, 0.25, 0.2]] * len(xs), "--")]
    assert plots.seed_interval(lines[0].samples[0], log=False)[1] < 0
    if kind == "band":
        fig = plots.mean_learning_curves_figure({"MSE": lines}, "epoch", "3 seeds")
    else:
        fig = plots.metric_vs_setting_figure({"final MSE": lines}, "dropout rate", "3 seeds")
    (ax,) = fig.axes
    fig.canvas.draw()
    assert ax.get_yscale() == "log"
    floor = ax.get_ylim()[0]
    drawn = [c for c in ax.collections if len(c.get_paths())]
    assert drawn
    for collection in drawn:
        for path in collection.get_paths():
            assert (path.vertices[:, 1] >= floor).all(), (kind, path.vertices[:, 1].min(), floor)
    for line in ax.lines:  # the lines, markers and error-bar caps
        assert (np.asarray(line.get_ydata(), dtype=float) >= floor).all(), (kind, line.get_label())
    assert ax.get_legend().get_title().get_text() == "geometric mean, 95% CI of log values (3 seeds)"
    plots.plt.close(fig)


def test_a_figure_saves_as_svg_with_its_text(made, tmp_path):
    fig = figures(made)["cifar/plots/learning_curves.png"]
    svg = plots.save_figure(fig, tmp_path / "curves.svg").read_text()
    assert svg.startswith("<?xml") and "cross-entropy (nats)" in svg and "accuracy (%)" in svg
