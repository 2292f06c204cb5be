"""Shared fixtures: a clean environment (no W&B credentials, data under tmp) and a way to run the
real CLI as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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


# How long a test waits for something a child process will do (a line, a file, an exit) before it
# fails: generous, since CI is a loaded 2-core machine and a wait ends as soon as its condition holds.
WAIT_S = 120.0


def wait_for(condition: Callable[[], object], what: str | Callable[[], str],
             proc: subprocess.Popen | Child | None = None, timeout: float = WAIT_S) -> object:
    """Poll `condition` until it returns something true, and return that. Fail naming `what` (or
    what it returns then, to describe the state at the end) when `timeout` seconds pass first, or
    when `proc` ends first (with its output)."""
    deadline = time.monotonic() + timeout
    while True:
        ended = proc is not None and proc.poll() is not None
        if found := condition():  # after the poll: a file written just before the exit still counts
            return found
        if ended or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    what = what() if callable(what) else what
    if ended:
        pytest.fail(f"the process ended ({proc.returncode}) before {what}:\n{output_of(proc)}")
    pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}"
                + (f"; its output so far:\n{proc.output()}" if isinstance(proc, Child) else ""))


def output_of(proc: subprocess.Popen | Child) -> str:
    """All that a process that has ended wrote to its piped stdout and stderr."""
    if isinstance(proc, Child):
        return proc.finish().output
    out, err = proc.communicate()
    return (out or "") + (err or "")


class Child:
    """`python -m dropstudy ARGS` started in the background, its stdout and stderr read line by
    line as it writes them, so a test can wait for a line (an answer to a signal) and still have
    the whole output once the process ends. Leaving a `with` block kills what is left of it (its
    session, when it leads one): a hang must not outlive its test."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], **popen: object) -> None:
        # Unbuffered, so a line on stdout can be read when it is printed, not only at exit.
        self.proc = subprocess.Popen([sys.executable, "-m", "dropstudy", *args], cwd=cwd,
                                     env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, **popen)
        self.pid = self.proc.pid
        self.leads_session = bool(popen.get("start_new_session"))
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._closed = 0  # streams read to their end
        self._arrived = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                         for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            with self._arrived:
                self._lines[name].append(line)
                self._arrived.notify_all()
        with self._arrived:
            self._closed += 1
            self._arrived.notify_all()

    def text(self, stream: str) -> str:
        with self._arrived:
            return "".join(self._lines[stream])

    def output(self) -> str:
        return self.text("stdout") + self.text("stderr")

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = WAIT_S) -> object:
        """`wait_for`, failing the test when this process ends before `condition` holds."""
        return wait_for(condition, what, self, timeout)

    def wait_for_line(self, text: str, stream: str = "stderr", timeout: float = WAIT_S) -> str:
        """The first line on `stream` that holds `text`, as soon as it is written; the test fails when
        the process closes its streams (ends) or `timeout` seconds pass without one."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not (found := [line for line in self._lines[stream] if text in line]):
                if self._closed == 2:
                    pytest.fail(f"the process ended ({self.proc.wait()}) without writing {text!r} on {stream}:\n"
                                + "".join(self._lines["stdout"] + self._lines["stderr"]))
                if time.monotonic() > deadline:
                    pytest.fail(f"gave up after {timeout:.0f} s waiting for {text!r} on {stream}; so far:\n"
                                + "".join(self._lines["stdout"] + self._lines["stderr"]))
                self._arrived.wait(timeout=1)
        return found[0]

    def finish(self, timeout: float = WAIT_S) -> CliResult:
        """Its exit code and whole output, once it ends; the test fails after `timeout` seconds."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the process was still running after {timeout:.0f} s:\n{self.output()}")
        for reader in self._readers:
            reader.join(timeout=timeout)
        return CliResult(self.proc.returncode, self.text("stdout"), self.text("stderr"))

    def kill(self) -> None:
        """SIGKILL to the process, or to what is left of its session when it leads one."""
        try:
            if self.leads_session:
                os.killpg(self.pid, signal.SIGKILL)
            elif self.proc.poll() is None:
                self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


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
