"""Online W&B that cannot start: the wait is said at once and bounded by tracker.init_timeout,
the run is logged by offline W&B instead (every row, with the `wandb sync` line to upload it
later), and later runs of the same process go offline without waiting or saying it again."""

from __future__ import annotations

import glob
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb
from conftest import QUICK_REGRESSION, read_jsonl
from omegaconf import OmegaConf
from wandb_offline import load_run

from dropstudy.tracking import wandb_run as tracking

INIT_TIMEOUT = 5
# Nothing listens on port 9 (discard) here: wandb's client retries the refused connection
# until init_timeout, as it would against a server it cannot reach.
UNREACHABLE = {"WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567", "WANDB_BASE_URL": "http://127.0.0.1:9"}


def sync_targets(line: str) -> list[str]:
    """The folders a printed `wandb sync ...` line names, as a shell would expand them."""
    words = shlex.split(line[line.index("wandb sync"):])
    return sorted(p for word in words[2:] for p in glob.glob(word))


def test_unreachable_online_wandb_falls_back_to_offline_with_every_row(clean_env, tmp_path):
    env = {**clean_env, **UNREACHABLE}
    # A hang guard, not a speed test: wandb's own default would wait 90 s before giving up.
    proc = subprocess.run(
        [sys.executable, "-m", "dropstudy", "train", *QUICK_REGRESSION, "tracker.mode=online",
         f"tracker.init_timeout={INIT_TIMEOUT}", "hydra.run.dir='my run'"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=INIT_TIMEOUT + 80,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "my run"
    connecting = [line for line in proc.stderr.splitlines() if line.startswith("W&B: connecting to")]
    assert connecting == [f"W&B: connecting to http://127.0.0.1:9 (tracker.init_timeout={INIT_TIMEOUT}s) ..."]
    fallback = [line for line in proc.stderr.splitlines() if "logging offline instead" in line]
    assert len(fallback) == 1 and "To upload later: wandb sync" in fallback[0], proc.stderr
    offline_dirs = sorted(str(p) for p in run.glob("wandb/offline-run-*"))
    assert len(offline_dirs) == 1 and sync_targets(fallback[0]) == offline_dirs, (fallback, offline_dirs)

    rows = read_jsonl(run / "metrics.jsonl")
    wb = load_run(run)
    logged = [r for r in wb.history if not any(k.startswith("plots/") for k in r)]  # the figures come last
    assert len(logged) == len(rows)
    for row, wb_row in zip(rows, logged):
        assert {k: wb_row.get(k) for k in row} == row
    assert wb.exit_code == 0
    summary = (run / "summary.json").read_text()
    assert '"status": "finished"' in summary and "offline-run-" in summary


@pytest.fixture
def refused_online(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """wandb.init refuses every online start (as an unreachable server does, at once); the modes
    asked for are recorded. The process-level fallback flag starts clear and is restored."""
    modes: list[str] = []
    real_init = wandb.init

    def init(*args, **kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Timed out while retrying\nConsider increasing the init_timeout setting")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(tracking, "_online_failed", None)
    return modes


def start(tmp_path: Path, name: str, **tracker: object) -> tracking.GuardedTracker:
    cfg = OmegaConf.create({"mode": "online", "project": "p", "entity": None, "init_timeout": 1, **tracker})
    return tracking.make_tracker(cfg, run_dir=tmp_path / name, group="g", job_type=name, tags=[], name=name,
                                 config={})


def test_later_runs_of_a_process_go_offline_without_asking_again(clean_env, tmp_path, refused_online, caplog):
    caplog.set_level("INFO", logger="dropstudy")
    for arm in ("dropout-0", "dropout-0.5"):
        (tmp_path / arm).mkdir()
        tracker = start(tmp_path, arm)
        tracker.log({"epoch": 1, "train/loss": 1.0}, step=0)
        tracker.finish()
        assert tracker.sync_command and arm in tracker.sync_command
    assert refused_online == ["online", "offline", "offline"], "one online attempt per process"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("W&B: connecting" in m for m in messages) == 1
    assert sum("logging offline instead" in m for m in messages) == 1
    assert load_when_written(tmp_path / "dropout-0.5").scalars("train/loss") == [1.0]


def load_when_written(run_dir, timeout_s: float = 30.0):
    """The offline run, once W&B's service has written it: `finish` returns in this process
    while the service may still be writing the file's last records."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return load_run(run_dir)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_when_offline_wandb_fails_too_the_run_trains_without_it(clean_env, tmp_path, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("no W&B at all")

    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setattr(tracking, "_online_failed", None)
    tracker = start(tmp_path, "run")
    assert isinstance(tracker.inner, tracking.NullTracker)
    assert any("W&B could not start offline either" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_a_bad_init_timeout_is_one_message_and_exit_2(clean_env, tmp_path, value):
    from typer.testing import CliRunner

    from dropstudy.cli import app

    result = CliRunner().invoke(app, ["train", f"tracker.init_timeout={value}"], prog_name="dropstudy")
    assert result.exit_code == 2, result.output
    assert "tracker.init_timeout" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()

