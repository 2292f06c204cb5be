"""Tracking modes and failures: auto goes offline without credentials, disabled touches nothing,
and a W&B failure never stops training or loses a local metric. What a run sends its tracker
(rows, steps, histograms, figures, summary, exit code), through a recording tracker in-process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
from conftest import QUICK_REGRESSION, QUICK_REGRESSION_LOGGED, read_jsonl
from recording_tracker import recording_trackers
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.config.compose import compose
from dropstudy.model.networks import build_model
from dropstudy.runs.execute import train_run
from dropstudy.store.text import flatten
from dropstudy.tracking.wandb_run import has_wandb_credentials, resolve_mode

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

    from dropstudy.tracking.wandb_run import WandbTracker, make_tracker

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


# --------------------------------------------------------------------------- what a run sends its tracker


def best_and_epoch(rows: list[dict], key: str, pick=min) -> tuple[float, int]:
    """The best value of `key` over the logged rows and the epoch of its first occurrence."""
    points = [(r[key], r["epoch"]) for r in rows if key in r]
    return pick(points, key=lambda p: p[0])


def test_a_run_sends_its_tracker_every_row_the_summary_and_the_figures(clean_env, tmp_path, monkeypatch, drawn_figures):
    trackers = recording_trackers(monkeypatch)
    cfg = compose(QUICK_REGRESSION)
    result = train_run(cfg, tmp_path / "run", QUICK_REGRESSION)
    assert result.status == "finished"
    run = (tmp_path / "run").resolve()
    rows, summary = read_jsonl(run / "metrics.jsonl"), json.loads((run / "summary.json").read_text())
    provenance = json.loads((run / "provenance.json").read_text())
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)

    (tracker,) = trackers
    made = tracker.created_with
    assert made["name"] == "regression-dropout-0.5-seed0" and made["job_type"] == "dropout-0.5"
    assert made["run_dir"] == tmp_path / "run" and {"regression", "dropout-0.5"} <= set(made["tags"])
    assert made["config"]["model.dropout"] == 0.5 and made["config"]["trainer.epochs"] == 40
    assert made["config"]["provenance.git.commit"] == provenance["git"]["commit"]
    # A resumed run continues this tracker's run: its id is in the checkpoint and the summary.
    assert checkpoint["tracker_run_id"] == summary["wandb"]["run_id"] == tracker.run_id

    assert tracker.rows == rows and tracker.steps == list(range(len(rows)))
    # tracker.log_freq=10 (steps, one per epoch here): every parameter and gradient at epochs 10,
    # 20, 30, 40, each joined to that epoch's row; the last ones are the final weights.
    histograms = tracker.of("log_histograms")
    assert [rows[h["step"]]["epoch"] for h in histograms] == [10, 20, 30, 40]
    names = [name for name, _ in build_model(cfg.model).named_parameters()]
    for h in histograms:
        assert set(h["tensors"]) == {f"{kind}/{name}" for kind in ("parameters", "gradients") for name in names}
    assert torch.equal(histograms[-1]["tensors"]["parameters/net.fc1.weight"], checkpoint["model"]["net.fc1.weight"])
    assert tracker.of("log_images") == [{"images": {"plots/learning_curves": run / "plots" / "learning_curves.png",
                                                    "plots/regression_fit": run / "plots" / "regression_fit.png"},
                                         "epoch": 40, "step": len(rows)}]
    best, epoch = best_and_epoch(rows, "val/loss")
    assert tracker.summary["best/val/loss"] == summary["best"]["val/loss"] == best
    assert tracker.summary["best/val/loss_epoch"] == summary["best"]["val/loss_epoch"] == epoch
    assert tracker.summary == {"status": "finished", **{f"best/{k}": v for k, v in summary["best"].items()}}
    assert tracker.calls[-1] == ("finish", {"exit_code": 0}) and len(tracker.of("finish")) == 1

    # The figures show the run: its logged losses, and the trained model's curve over x.
    curves = {label: line for axes in drawn_figures[run / "plots" / "learning_curves.png"] for label, line in axes.items()}
    for split, label in (("train", "train (dropout on)"), ("train_eval", "train (eval mode)"), ("val", "validation")):
        logged = [(r["epoch"], r[f"{split}/loss"]) for r in rows if f"{split}/loss" in r]
        assert curves[label] == ([e for e, _ in logged], [v for _, v in logged]), split
    (fit,) = drawn_figures[run / "plots" / "regression_fit.png"]
    ((label, (xs, ys)),) = fit.items()
    assert label.startswith("dropout-0.5: train MSE")
    model = build_model(cfg.model)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    with torch.no_grad():
        expected = model(torch.tensor(xs, dtype=torch.float32).unsqueeze(1)).squeeze(1)
    assert xs == pytest.approx(torch.linspace(-1, 1, 200).tolist())
    assert ys == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)


def test_a_diverged_run_tells_its_tracker_so_and_finishes_it_with_exit_code_1(clean_env, tmp_path, monkeypatch):
    trackers = recording_trackers(monkeypatch)
    result = train_run(compose(["optim.lr=1000", "trainer.epochs=200", "trainer.log_every=1"]), tmp_path / "run", [])
    assert result.status == "diverged"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (tracker,) = trackers
    # metrics.jsonl writes a non-finite value as text (JSON has no NaN); the tracker got the float.
    sent = [{k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            for row in tracker.rows]
    assert sent == read_jsonl(tmp_path / "run" / "metrics.jsonl") and sent[-1]["train/loss"] == "nan"
    assert tracker.summary["status"] == "diverged" and tracker.summary["diverged/epoch"] == summary["epoch"]
    assert tracker.summary["diverged/metric"] == "train/loss"
    assert tracker.calls[-1] == ("finish", {"exit_code": 1})


def test_every_member_of_a_vectorized_sweep_sends_its_own_tracker_its_rows_and_histograms(clean_env, tmp_path,
                                                                                       monkeypatch):
    trackers = recording_trackers(monkeypatch)
    result = runner.invoke(app, ["sweep", "model.dropout=0,0.5", "seed=0,1", "trainer.epochs=20",
                                 "trainer.eval_every=10", "tracker.log_freq=5", "hydra.sweep.dir=sw"],
                           prog_name="dropstudy")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["mode"] == "batched"
    assert [str(t.created_with["run_dir"]) for t in trackers] == ["sw/0", "sw/1", "sw/2", "sw/3"]
    first_weights = []
    for tracker, (rate, seed) in zip(trackers, [(0, 0), (0, 1), (0.5, 0), (0.5, 1)]):
        run = tmp_path / tracker.created_with["run_dir"]
        made = tracker.created_with
        assert made["name"] == f"regression-dropout-{rate:g}-seed{seed}" and made["group"] == "regression-sw"
        assert made["shared_process"] and "sweep" in made["tags"]
        assert (made["config"]["model.dropout"], made["config"]["seed"]) == (rate, seed)
        rows = read_jsonl(run / "metrics.jsonl")
        assert tracker.rows == rows and tracker.steps == list(range(len(rows)))
        # Each member logs its own histograms, of its own weights (a member's slice, not the
        # stacked tensor), joined to a logged row.
        histograms = tracker.of("log_histograms")
        assert histograms and all(0 <= h["step"] < len(rows) for h in histograms)
        assert {"gradients/net.fc1.weight", "parameters/net.fc1.weight"} <= histograms[0]["tensors"].keys()
        # The last histograms come after the last epoch's step: the member's final weights.
        final = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]["net.fc1.weight"]
        weights = histograms[-1]["tensors"]["parameters/net.fc1.weight"]
        assert torch.equal(weights.flatten().sort().values, final.flatten().sort().values)
        first_weights.append(histograms[0]["tensors"]["parameters/net.fc1.weight"])
        summary = json.loads((run / "summary.json").read_text())
        assert tracker.summary["best/val/loss"] == summary["best"]["val/loss"] == best_and_epoch(rows, "val/loss")[0]
        assert tracker.calls[-1] == ("finish", {"exit_code": 0})
    assert not torch.equal(first_weights[0], first_weights[1]), "each seed its own initial weights"


LAUNCH_PROBE = """
import json, sys
from pathlib import Path
from omegaconf import OmegaConf
from dropstudy.tracking.wandb_run import LAUNCH_INPUTS_MODULE, make_tracker

cfg = OmegaConf.create({"mode": "offline", "project": "p", "entity": None, "init_timeout": 30})
out = Path(sys.argv[1])

def start(name):
    (out / name).mkdir()
    tracker = make_tracker(cfg, run_dir=out / name, group="g", job_type=name, tags=[], name=name, config={})
    tracker.finish()
    return type(tracker.inner).__name__

report = {"first": start("first"), "loaded_by_init": LAUNCH_INPUTS_MODULE in sys.modules}
import wandb.sdk.launch.inputs.internal as staged  # what a W&B Launch job's config API loads
applied = []
staged.StagedLaunchInputs.apply = lambda self, run: applied.append(run.id)
report["second"] = start("second")
report["applied"] = len(applied)
print(json.dumps(report))
"""


def test_wandb_looks_for_launch_inputs_only_where_they_can_be_staged(clean_env, tmp_path):
    """skip_unstaged_launch_inputs: a run's start does not load W&B Launch (nothing could have
    staged inputs), and once Launch's inputs module is loaded, W&B applies staged inputs as it
    always did. In a fresh interpreter, so that no earlier test has loaded Launch."""
    proc = subprocess.run([sys.executable, "-c", LAUNCH_PROBE, str(tmp_path)], env=clean_env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"first": "WandbTracker", "loaded_by_init": False, "second": "WandbTracker", "applied": 1}


def test_private_patches_pass_arguments_through_and_step_aside_when_the_library_changes(caplog):
    """patch_private: a wrapper gets the original's arguments unchanged; a missing name or a
    different signature leaves the library as it was, with one debug line naming it."""
    import logging
    import types

    from dropstudy.tracking.wandb_run import patch_private

    calls = []

    def original(self, x, *, flag=False):
        calls.append((self, x, flag))
        return x * 2

    owner = types.SimpleNamespace(fn=original, __name__="lib")
    wrap = lambda orig: lambda *a, **k: orig(*a, **k) + 1  # noqa: E731
    assert patch_private(owner, "fn", ("self", "x", "flag"), wrap)
    assert owner.fn("s", 3, flag=True) == 7 and calls == [("s", 3, True)]
    assert patch_private(owner, "fn", ("self", "x", "flag"), wrap), "patching twice is a no-op"
    assert owner.fn("s", 1) == 3, "wrapped once, not twice"

    changed = types.SimpleNamespace(fn=original, __name__="lib")
    with caplog.at_level(logging.DEBUG, logger="dropstudy"):
        assert not patch_private(changed, "fn", ("self", "x"), wrap)
        assert not patch_private(changed, "gone", ("self",), wrap)
    assert changed.fn is original
    messages = [r.getMessage() for r in caplog.records]
    assert any("lib.fn" in m and "written for" in m for m in messages), messages
    assert any("lib.gone is missing" in m for m in messages), messages


def test_the_wandb_patches_fit_the_installed_wandb():
    """Both W&B patches apply to the installed wandb (a signature change there makes this fail,
    the cue to revisit them before lifting wandb's upper bound)."""
    import wandb

    from dropstudy.tracking.wandb_run import cache_installed_packages, skip_unstaged_launch_inputs

    assert cache_installed_packages(wandb)
    assert skip_unstaged_launch_inputs(wandb)
    assert getattr(wandb.util.working_set, "dropstudy_patch", False)


def test_comparison_run_carries_no_arm_and_every_run_summarises_each_loss_and_accuracy(dropstudy, tmp_path):
    """A study's W&B comparison run holds what its arms share and the list of arms, under a job
    type no arm has, and no model.dropout or seed for a group-by to read as one more arm. Every
    run keeps each loss's lowest and each accuracy's highest value, and each gap's last."""
    from wandb_offline import load_run

    result = dropstudy("study", "experiment=cifar10", "data.synthetic=true", "data.subset=64", "data.val_size=32",
                       "trainer.epochs=3", "trainer.batch_size=32", "study.arms=[0.0,0.25]", "hydra.run.dir=study")
    assert result.code == 0, result.output
    comparison = load_run(tmp_path / "study")
    arms = {arm: load_run(tmp_path / "study" / arm) for arm in ("dropout-0", "dropout-0.25")}
    assert comparison.job_type == "comparison" and comparison.job_type not in {r.job_type for r in arms.values()}
    assert "model.dropout" not in comparison.config and "seed" not in comparison.config
    assert comparison.config["study.arms"] == [0.0, 0.25] and comparison.config["study.seed"] == 0
    assert comparison.config["study.arm_labels"] == list(arms)
    shared = {k: v for k, v in arms["dropout-0"].config.items() if arms["dropout-0.25"].config.get(k) == v}
    assert {k: comparison.config[k] for k in ("trainer.epochs", "optim.lr", "data.subset")} == {
        k: shared[k] for k in ("trainer.epochs", "optim.lr", "data.subset")}
    assert arms["dropout-0.25"].config["model.dropout"] == 0.25 and arms["dropout-0.25"].config["seed"] == 0

    for arm, run in arms.items():
        for split in ("train", "train_eval", "val", "test"):
            for name, pick in (("loss", min), ("acc", max)):
                key = f"{split}/{name}"
                values = run.scalars(key)
                assert values, (arm, key)
                assert run.summary[key] == {pick.__name__: pick(values)}, (arm, key, run.summary[key])
        for key in ("gap/loss", "gap/acc"):
            values = run.scalars(key)
            assert len(values) == 3 and run.summary[key] == {"last": values[-1]}, (arm, key, run.summary[key])
