"""Tracking modes and failures: auto goes offline without credentials, disabled touches nothing,
and a W&B failure never stops training or loses a local metric."""

from __future__ import annotations

import json
from pathlib import Path

import wandb
from typer.testing import CliRunner

from conftest import QUICK_REGRESSION, QUICK_REGRESSION_LOGGED, read_jsonl
from dropstudy.cli import app
from dropstudy.config import compose
from dropstudy.tracking import flatten, has_wandb_credentials, resolve_mode

runner = CliRunner()


def test_auto_mode_is_offline_without_credentials(clean_env):
    assert not has_wandb_credentials()
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("disabled") == "disabled"


def test_auto_mode_is_online_with_a_key_or_netrc(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = Path(clean_env["HOME"]) / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment's explicit choice wins over auto
    assert resolve_mode("auto") == "offline"


def test_flatten_gives_dotted_keys_for_wandb_panels():
    assert flatten({"model": {"dropout": 0.5, "hidden": [2, 3]}, "seed": 1}) == {
        "model.dropout": 0.5,
        "model.hidden": [2, 3],
        "seed": 1,
    }


def test_disabled_tracking_writes_no_wandb_files(dropstudy, tmp_path):
    result = dropstudy("train", *QUICK_REGRESSION, "tracker.mode=disabled", "hydra.run.dir=run")
    assert result.code == 0, result.output
    assert not (tmp_path / "run" / "wandb").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
    assert "wandb sync" not in result.output


def _assert_complete_local_record(run: Path) -> None:
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows if "train/loss" in r] == QUICK_REGRESSION_LOGGED
    assert any("test/loss" in r for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and "test/loss" in summary["final"]


def test_wandb_failing_mid_run_does_not_stop_training(clean_env, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_log = wandb.sdk.wandb_run.Run.log

    def flaky_log(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise ConnectionError("W&B service refused the connection")
        return real_log(self, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", flaky_log)
    result = runner.invoke(app, ["train", *QUICK_REGRESSION, "hydra.run.dir=run"], prog_name="dropstudy")
    assert result.exit_code == 0, result.output
    assert calls["n"] == 6, "after the first failure, W&B is not called again"
    _assert_complete_local_record(tmp_path / "run")
    assert "W&B failed in log (ConnectionError" in (tmp_path / "run" / "train.log").read_text()


def test_wandb_failing_to_start_does_not_stop_training(clean_env, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("could not reach the W&B server")

    monkeypatch.setattr(wandb, "init", refuse)
    result = runner.invoke(app, ["train", *QUICK_REGRESSION, "hydra.run.dir=run"], prog_name="dropstudy")
    assert result.exit_code == 0, result.output
    _assert_complete_local_record(tmp_path / "run")
    assert "W&B could not start (CommError" in (tmp_path / "run" / "train.log").read_text()


def test_wandb_lists_the_installed_packages_once_per_process(clean_env, tmp_path, monkeypatch):
    """cache_installed_packages with the real wandb: two offline runs started in one process (as a
    study's arms are) each get a complete requirements.txt, and the installed packages, which
    wandb lists at every run start, are listed once."""
    import wandb.util

    from dropstudy.tracking import WandbTracker, make_tracker

    listings = []
    listed_by_wandb = wandb.util.working_set

    def listing():
        listings.append(1)
        return listed_by_wandb()

    monkeypatch.setattr(wandb.util, "working_set", listing)
    installed = {f"{d.key}=={d.version}" for d in listed_by_wandb()}
    assert {"torch", "wandb"} <= {line.split("==")[0] for line in installed}
    tracker_cfg = compose(["tracker.mode=offline"]).tracker
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        tracker = make_tracker(tracker_cfg, run_dir=tmp_path / name, group="g", job_type=name, tags=[], name=name,
                               config={})
        assert isinstance(tracker.inner, WandbTracker), "a real W&B run, not the fallback"
        tracker.finish()
    assert len(listings) == 1
    for name in ("first", "second"):
        requirements = next((tmp_path / name).glob("wandb/offline-run-*/files/requirements.txt")).read_text()
        assert set(requirements.splitlines()) == installed, name
