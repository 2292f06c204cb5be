"""Reproducible, resumable, fault-tolerant runs: determinism, rerun verdicts, kill-and-resume
equality, double Ctrl-C, divergence handling, and clear errors for broken run directories."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    PACKAGE_ROOT,
    QUICK_REGRESSION,
    Child,
    assert_provenance_matches_checkout,
    git_checkout_state,
    read_jsonl,
    run_once,
    wait_for,
)

from dropstudy.config.compose import compose, conf_dir
from dropstudy.store.rundir import RunDir

SYNTHETIC_CIFAR = ["experiment=cifar10", "data.synthetic=true", "data.subset=320", "data.val_size=64",
                   "trainer.batch_size=64", "tracker.log_freq=5"]
QUIET = ["tracker.mode=disabled"]  # W&B is tested where it matters; elsewhere it only costs time


def results(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock measurements, which no two runs share."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in read_jsonl(run / "metrics.jsonl")]


# --------------------------------------------------------------------------- determinism and rerun


@pytest.mark.parametrize("args", [[*QUICK_REGRESSION, *QUIET],
                                  pytest.param([*SYNTHETIC_CIFAR, "trainer.epochs=2", *QUIET], marks=pytest.mark.slow)],
                         ids=["regression", "cifar10"])
def test_same_config_and_seed_give_identical_metrics_and_rerun_says_so(dropstudy, tmp_path, args):
    assert dropstudy("train", *args, "hydra.run.dir=a").code == 0
    result = dropstudy("rerun", "a", "--out", "b")
    assert result.code == 0, result.output
    assert "verdict: identical" in result.stdout
    assert results(tmp_path / "a") == results(tmp_path / "b")
    verdict = json.loads((tmp_path / "b" / "rerun.json").read_text())
    assert verdict["verdict"] == "identical" and verdict["first_difference"] is None


def test_rerun_with_a_changed_override_differs(dropstudy, copy_of_run):
    result = dropstudy("rerun", "run", "model.dropout=0.3", "--out", "b")
    assert result.code == 1, result.output
    # Keys are compared in sorted order: the logged rate is the first to differ, then the loss.
    assert "verdict: differs" in result.stdout
    assert "first difference at step 0 (epoch 4): dropout/p/net.drop1 0.5 vs 0.3" in result.stdout
    assert "likely cause: the overrides given to rerun (model.dropout=0.3)" in result.stdout


@pytest.mark.slow
def test_data_split_depends_on_data_seed_only(dropstudy, tmp_path):
    for name, args in (("a", ["seed=0"]), ("b", ["seed=1", "data.seed=0"]), ("c", ["seed=1"])):
        assert dropstudy("train", *SYNTHETIC_CIFAR, "data.subset=128", "trainer.epochs=1", *QUIET, *args,
                         f"hydra.run.dir={name}").code == 0
    sha = {n: json.loads((tmp_path / n / "provenance.json").read_text())["data_sha256"] for n in "abc"}
    assert sha["a"] == sha["b"] != sha["c"]


def test_provenance_has_what_a_rerun_needs(copy_of_run):
    p = json.loads((copy_of_run / "provenance.json").read_text())
    assert "dropstudy train" in p["command"] or "-m dropstudy train" in p["command"]
    assert p["overrides"][:1] == ["trainer.epochs=40"]
    for name in ("python", "dropstudy", "torch", "torchvision", "wandb", "cuda", "cudnn"):
        assert name in p["versions"]
    assert len(p["data_sha256"]) == 64
    assert p["started"] <= p["ended"] and p["device"].startswith("cpu") and p["host"]
    # The run imported dropstudy from PACKAGE_ROOT, so its git state is that checkout's.
    assert_provenance_matches_checkout(copy_of_run, PACKAGE_ROOT / "dropstudy")


def test_provenance_records_a_dirty_checkout_and_its_diff_then_a_clean_one(clean_env, tmp_path):
    """dropstudy run from a copy of itself in a fresh git repository: with an uncommitted change
    the run records that commit, dirty, and the change in git.diff; once committed, clean."""
    repo = (tmp_path / "checkout").resolve()
    shutil.copytree(PACKAGE_ROOT / "dropstudy", repo / "src" / "dropstudy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(conf_dir(), repo / "conf")

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo,
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "a checkout")
    changed = repo / "src" / "dropstudy" / "__init__.py"
    changed.write_text(changed.read_text() + "# an uncommitted change\n")
    env = {**clean_env, "PYTHONPATH": str(repo / "src")}
    for name in ("dirty", "clean"):
        if name == "clean":
            git("commit", "-qam", "the change")
        proc = subprocess.run([sys.executable, "-m", "dropstudy", "train", "trainer.epochs=2", "trainer.eval_every=1",
                               *QUIET, f"hydra.run.dir={name}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        state, diff = git_checkout_state(repo)
        assert state["dirty"] == (name == "dirty") and ("an uncommitted change" in diff) == (name == "dirty")
        assert_provenance_matches_checkout(tmp_path / name, repo)


# --------------------------------------------------------------------------- interruption and resume


def start(clean_env, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dropstudy", *args], cwd=cwd, env=clean_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(run: Path, rows: int, proc: subprocess.Popen | Child) -> None:
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= rows, f"{rows} rows in {metrics}",
             proc)


@pytest.mark.parametrize(
    "args,rows",
    # W&B on for regression (the resumed W&B run is checked), off for CIFAR-10 to save time.
    # Rows, not epochs: regression logs every 10th epoch (row 50 is epoch 500).
    [pytest.param(["trainer.epochs=1200", "trainer.eval_every=100"], 50, marks=pytest.mark.slow),
     ([*SYNTHETIC_CIFAR, "trainer.epochs=3", *QUIET], 1)],
    ids=["regression", "cifar10"],
)
def test_sigterm_then_resume_equals_an_uninterrupted_run(dropstudy, clean_env, tmp_path, args, rows):
    assert dropstudy("train", *args, "hydra.run.dir=whole").code == 0
    proc = start(clean_env, tmp_path, "train", *args, "hydra.run.dir=cut")
    wait_for_rows(tmp_path / "cut", rows, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout + stderr
    assert "Traceback" not in stderr
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["reason"]
    assert "dropstudy resume" in stdout

    result = dropstudy("resume", "cut")
    assert result.code == 0, result.output
    assert results(tmp_path / "cut") == results(tmp_path / "whole")
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "finished"
    if "tracker.mode=disabled" not in args:
        runs = sorted((tmp_path / "cut" / "wandb").glob("offline-run-*"))
        assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1], "same W&B run id"
    provenance = json.loads((tmp_path / "cut" / "provenance.json").read_text())
    assert len(provenance["resumed"]) == 1


def test_second_ctrl_c_exits_at_once_and_keeps_the_last_checkpoint(dropstudy, clean_env, tmp_path):
    every = 25  # trainer.checkpoint_every
    args = ["trainer.eval_every=1000", f"trainer.checkpoint_every={every}", "trainer.log_every=1", *QUIET]
    with Child(["train", "trainer.epochs=100000", *args, "hydra.run.dir=run"], tmp_path, clean_env) as proc:
        wait_for_rows(tmp_path / "run", 3 * every, proc)
        proc.send_signal(signal.SIGINT)
        # The second one once the first is answered: the run is then in its clean-up, not training.
        proc.wait_for_line("SIGINT again exits at once")
        proc.send_signal(signal.SIGINT)
        rows_at_second_signal = len(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
        result = proc.finish()
    stdout, stderr = result.stdout, result.stderr
    assert result.code == 128 + signal.SIGINT, stdout + stderr
    # The second Ctrl-C ended the process itself, from the interrupt's clean-up (figures, summary),
    # without going back to training.
    assert "SIGINT again: exiting now" in stderr, stderr
    assert "Traceback" not in stderr
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == rows_at_second_signal
    # A row is logged every epoch, so the last one is the last epoch trained (its boundary state
    # may not have been taken yet when the first signal came). The checkpoint holds the boundary
    # the first Ctrl-C saved, or, when the second one came before that write was done, the last
    # one the cadence wrote; never anything in between or beyond.
    last = rows[-1]["epoch"]
    assert [r["epoch"] for r in rows] == list(range(1, last + 1))
    boundaries = {last - 1, last}
    expected = boundaries | {b // every * every for b in boundaries}
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] in expected and checkpoint["epoch"] >= every, (checkpoint["epoch"], last)
    # And it is that epoch's state: the weights a run stopping there by itself ends with.
    epoch = checkpoint["epoch"]
    assert dropstudy("train", f"trainer.epochs={epoch}", *args, "hydra.run.dir=reference").code == 0
    reference = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=False)
    assert reference["epoch"] == epoch and checkpoint["model"].keys() == reference["model"].keys()
    for name, weights in checkpoint["model"].items():
        assert torch.equal(weights, reference["model"][name]), name


def test_a_signal_after_a_slow_epoch_checkpoints_the_epoch_before_it(clean_env, tmp_path, monkeypatch,
                                                                      own_signal_handlers):
    """A loaded machine can make one of the regression's sub-millisecond epochs slower than
    DEFER_SIGNALS_BELOW_S; the next epoch then takes a signal at once, mid-epoch, and must
    checkpoint the epoch before it. It checkpointed the last boundary an earlier slow epoch had
    marked (a CI run of the double Ctrl-C test: checkpoint 65, rows to 75). The engine reads a
    clock of the test's own, so which epochs are slow does not depend on the machine."""
    import os
    import time

    from typer.testing import CliRunner

    from dropstudy.cli import app
    from dropstudy.engine import loop as engine
    from dropstudy.engine.backend import Backend as Single

    class Clock:
        """The engine's `time`: each reading a microsecond after the last, a second more across a slow epoch."""

        now = 0.0

        def perf_counter(self) -> float:
            self.now += 1e-6
            return self.now

        def __getattr__(self, name: str):
            return getattr(time, name)

    clock, current = Clock(), {}
    real_set_epoch, real_train_epoch = Single.set_epoch, Single.train_epoch

    def set_epoch(self, epoch):
        current["epoch"] = epoch
        if epoch == 14:  # the epoch after the second slow one, which defers nothing
            os.kill(os.getpid(), signal.SIGTERM)
        return real_set_epoch(self, epoch)

    def train_epoch(self, progress):
        if current["epoch"] in (5, 13):
            clock.now += 1.0
        return real_train_epoch(self, progress)

    monkeypatch.setattr(engine, "time", clock)
    monkeypatch.setattr(Single, "set_epoch", set_epoch)
    monkeypatch.setattr(Single, "train_epoch", train_epoch)
    result = CliRunner().invoke(app, ["train", "trainer.epochs=40", "trainer.checkpoint_every=25", *QUIET,
                                      "hydra.run.dir=run"], prog_name="dropstudy")
    assert result.exit_code == 143, result.output
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (checkpoint["epoch"], summary["epoch"]) == (13, 13), summary

# --------------------------------------------------------------------------- broken run directories


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One finished quick regression run, trained once for the tests that break copies of it."""
    where = tmp_path_factory.mktemp("trained")
    run_once(where, "train", *QUICK_REGRESSION, *QUIET, "hydra.run.dir=run")
    return where / "run"


@pytest.fixture
def copy_of_run(trained_run, tmp_path, clean_env) -> Path:
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def finished_run(copy_of_run: Path) -> Path:
    """The copy, marked interrupted so that `resume` gets as far as its checkpoint."""
    summary = copy_of_run / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "interrupted"}))
    return copy_of_run


def test_truncated_checkpoint_is_a_clear_error(dropstudy, tmp_path, copy_of_run):
    run = finished_run(copy_of_run)
    ckpt = run / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    result = dropstudy("resume", "run")
    assert result.code == 2 and str(ckpt.relative_to(tmp_path)) in result.stderr and "truncated or corrupt" in result.stderr
    assert "Traceback" not in result.output


def test_checkpoint_from_another_config_is_a_clear_error(dropstudy, tmp_path, copy_of_run):
    run = finished_run(copy_of_run)
    config = run / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("dropout: 0.5", "dropout: 0.3"))
    result = dropstudy("resume", "run")
    assert result.code == 2, result.output
    assert "different config" in result.stderr and "model.dropout: 0.5 -> 0.3" in result.stderr


@pytest.mark.slow
def test_checkpoint_for_another_model_is_a_clear_error(dropstudy, tmp_path, copy_of_run):
    run = finished_run(copy_of_run)
    ckpt = run / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=False)
    state["model"]["net.fc1.weight"] = torch.zeros(7, 1)
    torch.save(state, ckpt)
    result = dropstudy("resume", "run")
    assert result.code == 2 and "weights are for a different model" in result.stderr and "net.fc1.weight" in result.stderr


def test_directory_without_config_is_a_clear_error(dropstudy, tmp_path):
    (tmp_path / "notarun").mkdir()
    for command in ("resume", "rerun"):
        result = dropstudy(command, "notarun")
        assert result.code == 2 and ".hydra/config.yaml: missing" in result.stderr, result.output


def test_resuming_a_finished_run_says_there_is_nothing_to_do(dropstudy, copy_of_run):
    result = dropstudy("resume", "run")
    assert result.code == 2 and "nothing to resume" in result.stderr


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    rd.save_checkpoint({"epoch": 1})
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")  # serialised in memory first, then written: the failure comes mid-way
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        rd.save_checkpoint({"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert not list(tmp_path.rglob("*.tmp"))


# --------------------------------------------------------------------------- NaN handling


@pytest.mark.slow
def test_on_nan_raise_stops_with_diverged_summary(dropstudy, tmp_path):
    result = dropstudy("train", "optim.lr=1000", "trainer.epochs=50", "trainer.on_nan=raise",
                       "tracker.mode=disabled", "hydra.run.dir=run")
    assert result.code == 1 and "NonFiniteLoss" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "train/loss" in summary["reason"]


def test_on_nan_skip_skips_bad_steps_and_goes_on(clean_env, tmp_path):
    from dropstudy.runs.execute import train_run

    cfg = compose(["experiment=cifar10", "data.synthetic=true", "data.subset=256", "data.val_size=64",
                   "trainer.epochs=2", "trainer.batch_size=64", "trainer.on_nan=skip", "tracker.mode=disabled"])
    real_forward = torch.nn.Linear.forward
    calls = {"n": 0}

    def poisoned(self, x):  # the 3rd training batch's output is NaN
        out = real_forward(self, x)
        if self.out_features == 10 and self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out = out * float("nan")
        return out

    torch.nn.Linear.forward = poisoned
    try:
        result = train_run(cfg, tmp_path / "run", [])
    finally:
        torch.nn.Linear.forward = real_forward
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert result.status == "finished"
    assert [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r] == [1, 1]
    assert all(isinstance(r.get("train/loss", 0.0), float) for r in rows)
