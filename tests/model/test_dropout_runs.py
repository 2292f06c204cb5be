"""Dropout as a subject, through the CLI: a sweep over `model.dropout_kind`, scheduled rates,
max-norm and MC-dropout evaluation in a tracked run, the CNN's spatial dropout with calibration,
and `dropstudy demo`.

The runs are the real `dropstudy` app invoked in this process (as in test_tracking), on
shrunken configs: the same code path as the command line, without a new interpreter per run.
"""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import read_figure, read_jsonl, reliability
from test_reproducibility import results, start, wait_for_rows
from typer.testing import CliRunner
from wandb_offline import load_run

from dropstudy.cli import app
from dropstudy.config.compose import compose
from dropstudy.data.datasets import load_dataset
from dropstudy.engine.runtime import seed_everything
from dropstudy.model.networks import build_model

runner = CliRunner()
QUICK = ["trainer.epochs=20", "trainer.eval_every=10", "trainer.log_every=1"]  # a row every epoch: the schedules are read per epoch
Z = 4.5  # as in test_dropout: a correct implementation falls outside with probability 7e-6


def dropstudy(*args: str):
    return runner.invoke(app, list(args), prog_name="dropstudy")


def run_files(run: Path) -> tuple[dict, list[dict]]:
    return json.loads((run / "summary.json").read_text()), read_jsonl(run / "metrics.jsonl")


# --------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_a_sweep_over_dropout_kinds_runs_end_to_end(clean_env, tmp_path):
    kinds = ("inverted", "vanilla", "gaussian", "none")
    train_losses = {}
    for kind in kinds:
        result = dropstudy("train", *QUICK, f"model.dropout_kind={kind}", "tracker.mode=disabled",
                           f"hydra.run.dir=sweep/{kind}")
        assert result.exit_code == 0, result.output
        summary, rows = run_files(tmp_path / "sweep" / kind)
        assert summary["status"] == "finished" and summary["dropout_kind"] == kind
        assert len(summary["dropout_sites"]) == (0 if kind == "none" else 3)
        assert math.isfinite(summary["final"]["val/loss"]) and math.isfinite(summary["final"]["test/loss"])
        assert ("dropout/p/net.drop1" in rows[0]) == (kind != "none")
        assert {"weights/l2/net.fc1", "weights/l2/net.out"} <= rows[9].keys()
        train_losses[kind] = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len({tuple(v) for v in train_losses.values()}) == len(kinds), "each kind trains differently"

    # `none` is dropout with p = 0: no site draws, so the runs are identical step for step. And
    # MC-dropout evaluation draws from a forked generator: it does not change how a run trains.
    for name, args, same_as in (("p0", ["model.dropout=0"], "none"), ("mc", ["eval.mc_samples=5"], "inverted")):
        result = dropstudy("train", *QUICK, *args, "tracker.mode=disabled", f"hydra.run.dir=sweep/{name}")
        assert result.exit_code == 0, result.output
        rows = run_files(tmp_path / "sweep" / name)[1]
        assert [r["train/loss"] for r in rows if "train/loss" in r] == train_losses[same_as], name


def test_schedule_max_norm_and_mc_dropout_in_a_tracked_run(clean_env, tmp_path):
    result = dropstudy(
        "train", *QUICK, "model.input_dropout=0.1", "model.dropout_schedule.kind=warmup",
        "model.dropout_schedule.epochs=10", "optim.max_norm=1.0", "eval.mc_samples=20",
        "tracker.mode=offline", "hydra.run.dir=run",
    )
    assert result.exit_code == 0, result.output
    assert ("dropout sites (warmup: 0 -> p over 10 epochs): net.drop_in (on the inputs): inverted p=0.1, "
            "net.drop1 (after fc1): inverted p=0.5") in result.output
    run = tmp_path / "run"
    summary, rows = run_files(run)
    by_epoch = {r["epoch"]: r for r in rows if "train/loss" in r}
    for epoch, p in ((1, 0.0), (6, 0.25), (11, 0.5), (20, 0.5)):
        assert by_epoch[epoch]["dropout/p/net.drop1"] == pytest.approx(p)
        assert by_epoch[epoch]["dropout/p/net.drop_in"] == pytest.approx(p / 5)
    for epoch in (10, 20):
        assert {"val/loss", "val_mc/loss", "val_mc/std", "weights/l2/net.fc1", "weights/l2/net.out"} <= by_epoch[epoch].keys()
        assert by_epoch[epoch]["val_mc/std"] > 0
    assert "val_mc/loss" not in by_epoch[5] and "test_mc/loss" in rows[-1]

    model = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    weights = [v for k, v in model.items() if k.endswith(".weight")]
    assert len(weights) == 4 and all((w.norm(dim=1) <= 1.0 + 1e-6).all() for w in weights), "max-norm after the last step"
    read_figure(run / "plots" / "regression_fit.png")

    wb = load_run(run)
    assert {"val_mc/loss", "test_mc/loss", "dropout/p/net.drop1", "weights/l2/net.fc1"} <= wb.history_keys()
    assert wb.scalars("dropout/p/net.drop1")[:2] == [0.0, pytest.approx(0.05)]
    assert wb.config["model.dropout_sites"] == summary["dropout_sites"]
    assert wb.config["optim.max_norm"] == 1.0 and wb.config["eval.mc_samples"] == 20
    assert "plots/regression_fit" in wb.images()


def test_cnn_spatial_dropout_and_calibration(clean_env, tmp_path, drawn_figures):
    args = ["experiment=cifar10", "data.synthetic=true", "data.subset=128", "data.val_size=32", "trainer.epochs=1",
            "trainer.batch_size=32", "model.dropout_kind=spatial", "model.conv_dropout=0.2", "eval.mc_samples=5"]
    result = dropstudy("train", *args, "tracker.mode=offline", "hydra.run.dir=run")
    assert result.exit_code == 0, result.output
    run = (tmp_path / "run").resolve()
    summary, _ = run_files(run)
    assert summary["dropout_sites"][0] == "features.drop1 (after conv block 1): spatial p=0.2"
    assert summary["dropout_sites"][3:] == ["head.drop1 (before fc1): inverted p=0.25",
                                            "head.drop2 (before fc2): inverted p=0.25"]
    final = summary["final"]
    assert 0 <= final["val_mc/acc"] <= 1 and 0 <= final["val_mc/ece"] <= 1
    assert 0 < final["val_mc/entropy"] <= math.log(10) + 1e-6
    assert summary["calibration"]["test_mc/ece"] == pytest.approx(final["test_mc/ece"])

    # The deterministic ECE and reliability diagram, recomputed here from the trained model's
    # predictions on the run's own test set (after one epoch they fill one bin; the binning over
    # every bin is checked in test_dropout).
    cfg = compose(args)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data, torch.device("cpu"), lambda message: None)
    assert data.fingerprint() == json.loads((run / "provenance.json").read_text())["data_sha256"]
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"])
    model.eval()
    with torch.no_grad():
        probs = model(data.prepare(data.test.inputs)).softmax(-1).double().numpy()
    ece, points = reliability(probs, data.test.targets.numpy())
    assert summary["calibration"]["test/ece"] == pytest.approx(ece, abs=1e-6)
    diagram = drawn_figures[run / "plots" / "calibration.png"][0]  # then the entropies and the bin counts
    (deterministic,) = [line for label, line in diagram.items() if label.startswith("deterministic: ECE")]
    assert deterministic == (pytest.approx([c for c, _ in points], abs=1e-6), pytest.approx([a for _, a in points]))
    read_figure(run / "plots" / "calibration.png", min_width=800)
    assert {"plots/calibration", "plots/learning_curves"} <= load_run(run).images()


@pytest.mark.slow
def test_resumed_run_with_schedule_mc_and_max_norm_equals_an_uninterrupted_one(clean_env, tmp_path):
    """p is a function of the epoch (not state a checkpoint would need), and the MC passes and
    the max-norm step happen inside the epochs a checkpoint brackets: killed and resumed
    mid-way, the run logs exactly what an uninterrupted one does."""
    args = ["trainer.epochs=400", "trainer.eval_every=100", "model.dropout_schedule.kind=anneal",
            "eval.mc_samples=5", "optim.max_norm=2", "tracker.mode=disabled"]
    assert dropstudy("train", *args, "hydra.run.dir=whole").exit_code == 0
    proc = start(clean_env, tmp_path, "train", *args, "hydra.run.dir=cut")
    wait_for_rows(tmp_path / "cut", 15, proc)  # epoch 150: regression logs every 10th epoch
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    result = dropstudy("resume", "cut")
    assert result.exit_code == 0, result.output
    assert 0 < json.loads((tmp_path / "cut" / "provenance.json").read_text())["resumed"][0]["from_epoch"] < 400
    assert results(tmp_path / "cut") == results(tmp_path / "whole")


def test_study_with_kind_none_is_refused_but_train_is_not(clean_env, tmp_path):
    result = dropstudy("study", "model.dropout_kind=none")
    assert result.exit_code == 2 and "model.dropout_kind=none" in result.output and "study.arms" in result.output
    assert not (tmp_path / "runs").exists()
    assert dropstudy("train", "--cfg", "model.dropout_kind=none").exit_code == 0


# --------------------------------------------------------------------------- demos


def numbers(line: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"[-+]?\d[\d,]*\.?\d*", line)]


def line_with(output: str, *parts: str) -> str:
    return next(line for line in output.splitlines() if all(p in line for p in parts))


def test_demo_list_help_and_unknown_names():
    listed = dropstudy("demo", "--list")
    assert listed.exit_code == 0
    assert [line.split()[0] for line in listed.output.splitlines()] == ["scaling", "masks", "equivalence"]
    help_text = dropstudy("demo", "--help")
    assert help_text.exit_code == 0 and "Examples" in help_text.output and "--list" in help_text.output
    for args in (["demo", "dropconnect"], ["demo"]):
        result = dropstudy(*args)
        assert result.exit_code == 2 and "scaling, masks, equivalence" in result.output, result.output
        assert "Traceback" not in result.output


def test_demo_scaling_prints_the_expected_and_exact_outputs(clean_env, tmp_path):
    result = dropstudy("demo", "scaling", "--out", "figs")
    assert result.exit_code == 0, result.output
    out = result.output
    inverted, vanilla = out.split("\nvanilla")
    for text, expected, sd in ((inverted, 10_000, 100), (vanilla, 5_000, 50)):
        draw = numbers(line_with(text, "training mode, one draw"))
        assert draw[1:3] == [expected, sd], draw  # printed expectation and binomial sd
        assert abs(draw[0] - expected) <= Z * sd
        assert numbers(line_with(text, "evaluation mode")) == [expected]
        assert "exactly" in line_with(text, "evaluation mode")
    read_figure(tmp_path / "figs" / "scaling.png")
    assert "figure: figs/scaling.png" in out
    assert dropstudy("demo", "scaling", "--out", "figs").output == out, "seeded: the same numbers every time"
    assert dropstudy("demo", "scaling", "--out", "figs", "--seed", "1").output != out


def test_demo_masks_shows_masks_and_rates_near_p(clean_env, tmp_path):
    result = dropstudy("demo", "masks")
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if line.strip().startswith("step ")]
    assert len(steps) == 8
    for line in steps:
        cells = line.split("   kept")[0].split()[2:]
        assert len(cells) == 12 and set(cells) <= {"#", "."}
        assert int(line.split("kept")[1].split("/")[0]) == cells.count("#")
    rows = [numbers(line) for line in result.output.splitlines() if re.match(r"^\s+0\.\d+\s+\d", line)]
    assert [r[0] for r in rows] == [0.1, 0.2, 0.5, 0.8]
    for p, dropped, rate, sd, _z in rows:
        assert dropped == pytest.approx(rate * 120_000, abs=6) and abs(rate - p) <= Z * sd
    read_figure(tmp_path / "runs" / "demo" / "masks" / "masks.png")


def test_demo_equivalence_gives_the_same_expectation(clean_env, tmp_path):
    result = dropstudy("demo", "equivalence")
    assert result.exit_code == 0, result.output
    exact = numbers(line_with(result.output, "exact expected output"))[-1]
    for name in ("inverted, weights w ", "vanilla, weights w/(1-p)"):
        mean, low, high, evaluation = numbers(line_with(result.output, name).split(name)[1])
        assert low <= exact <= high and evaluation == pytest.approx(exact, abs=1e-4)
    assert "contains 0: the same expected output" in result.output
    read_figure(tmp_path / "runs" / "demo" / "equivalence" / "equivalence.png")
