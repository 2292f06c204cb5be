"""The regression study end to end through the CLI: a run directory as the README lays it out,
the W&B offline file read back, the study's arms and comparison, and interruption."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from importlib import metadata

import pytest
import torch
import yaml
from conftest import (
    PACKAGE_ROOT,
    QUICK_REGRESSION,
    QUICK_REGRESSION_LOGGED,
    assert_provenance_matches_checkout,
    read_figure,
    read_jsonl,
    wait_for,
)
from wandb_offline import load_run

METRICS = ("train/loss", "val/loss", "gap/loss", "lr", "perf/samples_per_s")


def test_train_writes_a_complete_run_directory(dropstudy, tmp_path):
    result = dropstudy("train", *QUICK_REGRESSION, "hydra.run.dir=run")
    assert result.code == 0, result.output
    run = tmp_path / "run"
    assert "device: cpu" in result.output
    assert f"run dir: {run}" in result.stdout and "wandb sync" in result.stdout

    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["experiment"] == "regression" and config["model"]["dropout"] == 0.5
    assert "trainer.epochs=40" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())

    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["versions"]["torch"] == metadata.version("torch")
    assert {"command", "git", "versions", "device", "host"} <= provenance.keys()
    assert_provenance_matches_checkout(run, PACKAGE_ROOT / "dropstudy")

    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["epoch"] for r in train_rows] == QUICK_REGRESSION_LOGGED
    assert [r["epoch"] for r in rows if "val/loss" in r] == [10, 20, 30, 40]
    assert any("test/loss" in r for r in rows)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epoch"] == 40
    # best: the lowest logged val/loss and the epoch it was logged at; final: the last one.
    val = [(r["val/loss"], r["epoch"]) for r in rows if "val/loss" in r]
    best = min(val, key=lambda point: point[0])
    assert (summary["best"]["val/loss"], summary["best"]["val/loss_epoch"]) == best
    assert summary["final"]["val/loss"] == val[-1][0]

    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 40 and {"model", "optimizer", "rng"} <= checkpoint.keys()
    assert {p.name for p in (run / "plots").iterdir()} == {"learning_curves.png", "regression_fit.png"}
    for figure in (run / "plots").iterdir():
        read_figure(figure)


def test_wandb_offline_file_holds_metrics_histograms_images_and_config(dropstudy, tmp_path):
    result = dropstudy("train", *QUICK_REGRESSION, "tracker.group=g1", "tracker.tags=[paper]", "hydra.run.dir=run")
    assert result.code == 0, result.output
    wb = load_run(tmp_path / "run")
    assert wb.group == "g1" and wb.job_type == "dropout-0.5"
    assert {"paper", "regression", "dropout-0.5"} <= set(wb.tags)
    keys = wb.history_keys()
    for key in (*METRICS, "epoch", "test/loss"):
        assert key in keys, key
    assert len(wb.scalars("train/loss")) == len(QUICK_REGRESSION_LOGGED)
    local = [r["train/loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert wb.scalars("train/loss") == local, "W&B got exactly the metrics written locally"
    histograms = wb.histograms()
    for prefix in ("gradients/", "parameters/"):
        assert any(k.startswith(prefix + "net.fc1.") for k in histograms), (prefix, sorted(histograms))
    assert {"plots/learning_curves", "plots/regression_fit"} <= set(wb.images())
    assert wb.config["model.dropout"] == 0.5 and wb.config["seed"] == 0
    assert wb.config["trainer.epochs"] == 40 and "provenance.git.commit" in wb.config
    assert wb.summary.get("val/loss") is not None


def test_study_trains_both_arms_on_the_same_data_and_compares(dropstudy, tmp_path):
    # Full length (2000 epochs): the classic demo's result, not just its plumbing.
    started = time.perf_counter()
    result = dropstudy("study", "hydra.run.dir=study")
    wall = time.perf_counter() - started
    assert result.code == 0, result.output
    study = tmp_path / "study"
    arms = {arm: study / arm for arm in ("dropout-0", "dropout-0.5")}
    for arm, run in arms.items():
        assert f"run dir: {run}" in result.stdout
        assert (run / "summary.json").is_file()
        read_figure(run / "plots" / "regression_fit.png")
    assert f"comparison figure: {study / 'plots' / 'regression_fit.png'}" in result.stdout
    for name in ("regression_fit.png", "study_curves.png", "weight_norms.png"):
        read_figure(study / "plots" / name)

    configs = {arm: yaml.safe_load((run / ".hydra" / "config.yaml").read_text()) for arm, run in arms.items()}
    assert configs["dropout-0"]["model"]["dropout"] == 0.0 and configs["dropout-0.5"]["model"]["dropout"] == 0.5
    configs["dropout-0"]["model"].pop("dropout"), configs["dropout-0.5"]["model"].pop("dropout")
    assert configs["dropout-0"] == configs["dropout-0.5"], "arms differ only in model.dropout"

    fits = {arm: json.loads((run / "summary.json").read_text())["fit"] for arm, run in arms.items()}
    assert fits["dropout-0"]["train_mse"] < 1e-3, "without dropout the curve passes through the training points"
    assert fits["dropout-0.5"]["train_mse"] > 100 * fits["dropout-0"]["train_mse"]

    runs = {arm: load_run(run) for arm, run in arms.items()}
    assert runs["dropout-0"].group == runs["dropout-0.5"].group != ""
    assert {r.job_type for r in runs.values()} == {"dropout-0", "dropout-0.5"}
    for run in runs.values():  # the second model trained in the process keeps the same names
        assert {"gradients/net.fc1.weight", "parameters/net.fc1.weight"} <= run.histograms()
    for arm, run in arms.items():  # the second arm's package list comes from the process's cache
        requirements = next(run.glob("wandb/offline-run-*/files/requirements.txt")).read_text()
        assert "torch==" in requirements and "wandb==" in requirements, arm
    comparison = load_run(study)
    assert comparison.job_type == "comparison" and comparison.group == runs["dropout-0"].group
    assert {"study/regression_fit", "study/study_curves", "study/weight_norms"} <= set(comparison.images())

    # The last line says where the time went: the arms' own accounts (summary.json), summed.
    total, parts = time_line(result.stdout.strip().splitlines()[-1])
    timings = [json.loads((run / "summary.json").read_text())["timings_s"] for run in arms.values()]
    assert parts["training"] == pytest.approx(sum(t["train"] + t["eval"] for t in timings), abs=0.06)
    assert parts["set-up"] == pytest.approx(sum(t["data"] + t["setup"] for t in timings), abs=0.06)
    assert parts["W&B"] >= sum(t["wandb"] for t in timings) - 0.06  # the summaries are written before W&B's finish
    assert min(parts.values()) >= -0.05, "no second counted twice"
    assert 0 < total <= wall


def time_line(line: str) -> tuple[float, dict[str, float]]:
    """`time: 9.1 s = start-up 2.0 s, W&B 0.4 s, ...` as (9.1, {"start-up": 2.0, "W&B": 0.4, ...})."""
    head, _, tail = line.partition(" = ")
    assert head.startswith("time: ") and head.endswith(" s"), line
    parts = {}
    for part in tail.split(", "):
        name, seconds, unit = part.rsplit(" ", 2)
        assert unit == "s", line
        parts[name] = float(seconds)
    return float(head[len("time: "):-2]), parts


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_says_interrupted(clean_env, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropstudy", "train", "trainer.epochs=100000", "trainer.eval_every=1000",
         "tracker.mode=disabled", "hydra.run.dir=run"],
        cwd=tmp_path, env=clean_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 2000, f"2000 bytes of rows in {metrics}", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["epoch"] < 100000
    assert "SIGINT" in summary["reason"] and "dropstudy resume" in stdout
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == summary["epoch"], "the checkpoint holds the last completed epoch"


def test_nan_loss_stops_the_run_as_diverged(dropstudy, tmp_path):
    result = dropstudy("train", "optim.lr=1000", "trainer.epochs=200", "tracker.mode=disabled", "hydra.run.dir=run")
    assert result.code == 1, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "train/loss became nan" in summary["reason"]
    assert summary["epoch"] < 200 and "diverged" in result.stdout

