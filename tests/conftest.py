"""Shared fixtures: a clean environment (no W&B credentials, data under tmp) and a way to run the
real CLI as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import dropstudy

REPO = Path(__file__).resolve().parents[1]
# The directory this process imports dropstudy from (src/ of the checkout under test). The CLI
# subprocesses get it first on PYTHONPATH, so they run this same code and not whatever else is
# installed (a relative PYTHONPATH=src would not hold in their temporary working directories).
PACKAGE_ROOT = Path(dropstudy.__file__).resolve().parents[1]


def python_path() -> str:
    return os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """No W&B credentials or mode from the developer's machine; HOME and data inside tmp, so
    `tracker.mode=auto` resolves to offline and nothing is written outside the test."""
    home = tmp_path / "home"
    home.mkdir()
    for key in list(os.environ):
        if key.startswith("WANDB_") or key in ("NETRC", "DROPSTUDY_DATA"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DROPSTUDY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("MPLCONFIGDIR", str(home / ".mpl"))
    monkeypatch.setenv("PYTHONPATH", python_path())
    monkeypatch.chdir(tmp_path)
    return dict(os.environ)


@pytest.fixture
def dropstudy(clean_env: dict[str, str], tmp_path: Path):
    """Run `python -m dropstudy ARGS...` in tmp_path and return its exit code and output."""

    def run(*args: str, timeout: float = 240) -> CliResult:
        proc = subprocess.run(
            [sys.executable, "-m", "dropstudy", *args],
            cwd=tmp_path,
            env=clean_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


def git_checkout_state(where: Path) -> tuple[dict, str] | None:
    """What git itself says about the checkout `where` is in: its commit, whether a tracked file
    differs from it, its top level, and that difference (`git diff HEAD`); None outside one."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    state = {"commit": head.stdout.strip(), "dirty": dirty, "root": git("rev-parse", "--show-toplevel").stdout.strip()}
    return state, git("diff", "HEAD").stdout if dirty else ""


def assert_provenance_matches_checkout(run: Path, where: Path) -> None:
    """provenance.json's git block (and git.diff) say what git says about the checkout at `where`."""
    recorded = json.loads((run / "provenance.json").read_text())["git"]
    actual = git_checkout_state(where)
    if actual is None:  # not run from a checkout, and the run's working directory is none either
        assert recorded == {"commit": None, "dirty": None, "root": None}
        return
    state, diff = actual
    assert {k: recorded.get(k) for k in state} == state
    if state["dirty"]:
        assert recorded["diff_file"] == "git.diff" and (run / "git.diff").read_text() == diff
    else:
        assert "diff_file" not in recorded and not (run / "git.diff").exists()


def read_figure(path: Path, min_width: int = 400, min_height: int = 300) -> np.ndarray:
    """A PNG's pixels (height x width x channels), checked to be a drawn figure: a real image of a
    figure's size with lines and text on it, not a blank canvas."""
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, (path, pixels.shape)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 20, (path, f"{len(colours)} colours: a blank figure")
    return pixels


@pytest.fixture
def drawn_figures(monkeypatch: pytest.MonkeyPatch) -> dict[Path, list[dict[str, tuple[list, list]]]]:
    """Every figure this process saves from now on, by path: for each of its axes, the lines
    drawn on it by label, as (x, y). What a figure shows, read off the figure itself."""
    import matplotlib.figure

    figures: dict[Path, list[dict[str, tuple[list, list]]]] = {}
    savefig = matplotlib.figure.Figure.savefig

    def recording(fig, path, *args, **kwargs):
        figures[Path(path).resolve()] = [
            {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
            for ax in fig.axes
        ]
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording)
    return figures


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> tuple[float, list[tuple[float, float]]]:
    """Expected calibration error by hand (Guo et al. 2017): over equal-width confidence bins
    (lo, hi], the share of examples in a bin times |its accuracy - its mean confidence|; and the
    (mean confidence, accuracy) of each non-empty bin, the reliability diagram's points. Written
    apart from dropstudy.uncertainty, to check it."""
    confidence, correct = probs.max(1), probs.argmax(1) == targets
    ece, points = 0.0, []
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
            points.append((confidence[inside].mean(), correct[inside].mean()))
    return float(ece), points


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Shrunken settings that keep every code path but run in seconds.
QUICK_REGRESSION = ["trainer.epochs=40", "trainer.eval_every=10", "trainer.log_every=4", "tracker.log_freq=10"]
# The epochs those runs log a metrics row for: every 4th (trainer.log_every) and every evaluation.
QUICK_REGRESSION_LOGGED = [4, 8, 10, 12, 16, 20, 24, 28, 30, 32, 36, 40]
QUICK_CIFAR = [
    "experiment=cifar10",
    "trainer.epochs=2",
    "trainer.batch_size=32",
    "data.val_size=40",
    "tracker.log_freq=2",
]


# --------------------------------------------------------------------------- sweeps

SWEEP_GRID = ["model.dropout=0,0.5", "seed=0,1", "trainer.epochs=20", "trainer.eval_every=10", "tracker.log_freq=10"]


def clean_environment(tmp: Path) -> dict[str, str]:
    """What `clean_env` sets up, for fixtures wider than one test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "DROPSTUDY_DATA")}
    (tmp / "home").mkdir(exist_ok=True)
    env.update(HOME=str(tmp / "home"), DROPSTUDY_DATA=str(tmp / "data"), MPLCONFIGDIR=str(tmp / "home" / ".mpl"),
               PYTHONPATH=python_path())
    return env


def run_once(where: Path, *args: str) -> None:
    """`python -m dropstudy ARGS` in `where`, in a clean environment, for module- or session-wide
    fixtures (a run or study that several tests copy); it must succeed."""
    proc = subprocess.run([sys.executable, "-m", "dropstudy", *args], cwd=where, env=clean_environment(where),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def regression_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CliResult]:
    """One 2x2 sweep (dropout 0/0.5 x seed 0/1, 20 epochs) on the basic launcher, W&B offline;
    shared by the sweep and report tests, since each job costs seconds."""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run(
        [sys.executable, "-m", "dropstudy", "sweep", *SWEEP_GRID, "sweep.vectorize=false", "hydra.sweep.dir=sw"],
        cwd=tmp, env=clean_environment(tmp), capture_output=True, text=True, timeout=600,
    )
    return tmp / "sw", CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def own_signal_handlers():
    """An interrupted engine leaves exit-at-once handlers for a second signal; put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
