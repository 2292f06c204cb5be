"""The evaluation cadence and the train-val gap: `gap/*` is validation minus the training data in
eval mode (dropout off, `train_eval/*`), checked here against a loss computed apart from dropstudy
from the run's own checkpoint, for `train` on both experiments and for a batched sweep member."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl
from omegaconf import OmegaConf

from dropstudy.config.compose import compose
from dropstudy.data.datasets import load_cifar10, make_regression
from dropstudy.model.networks import build_model

# Long enough for p=0.5 dropout to keep the training-mode loss well above the eval-mode one.
REGRESSION = ["model.dropout=0.5", "trainer.epochs=300", "trainer.eval_every=10", "tracker.mode=disabled"]
CIFAR = ["experiment=cifar10", "data.synthetic=true", "data.subset=256", "data.val_size=64", "trainer.epochs=2",
         "trainer.batch_size=32", "model.dropout=0.5", "tracker.mode=disabled"]


def last_model(run: Path) -> tuple[torch.nn.Module, dict]:
    """The model checkpoints/last.pt holds, in eval mode, and the run's config."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def last_evaluation(run: Path) -> dict:
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r]
    return rows[-1]


def check_regression_gap(run: Path) -> None:
    """At the last evaluation, train_eval/loss is the eval-mode MSE on the regenerated training
    points, and gap/loss = val/loss minus it; the training-mode loss differs."""
    model, cfg = last_model(run)
    data = make_regression(cfg.data)
    with torch.no_grad():
        train_mse = F.mse_loss(model(data.train.inputs), data.train.targets).item()
        val_mse = F.mse_loss(model(data.val.inputs), data.val.targets).item()
    row = last_evaluation(run)
    assert row["epoch"] == cfg.trainer.epochs
    assert row["train_eval/loss"] == pytest.approx(train_mse, rel=1e-5)
    assert row["val/loss"] == pytest.approx(val_mse, rel=1e-5)
    assert row["gap/loss"] == pytest.approx(val_mse - train_mse, rel=1e-4, abs=1e-6)
    # The training-mode loss is another number: dropout p=0.5 inflates it (one mask draw an epoch, so
    # it is compared on average over the evaluations), which biased the old gap, val - train/loss.
    assert row["train/loss"] != pytest.approx(row["train_eval/loss"], rel=1e-3)
    evaluated = [r for r in read_jsonl(run / "metrics.jsonl") if "train_eval/loss" in r]
    mean = lambda key: sum(r[key] for r in evaluated) / len(evaluated)  # noqa: E731
    assert mean("train/loss") > 1.2 * mean("train_eval/loss")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["gap/loss"] == row["gap/loss"]
    assert summary["final"]["train_eval/loss"] == row["train_eval/loss"]


def test_regression_gap_is_val_minus_the_eval_mode_training_loss(dropstudy, tmp_path):
    result = dropstudy("train", *REGRESSION, "hydra.run.dir=run")
    assert result.code == 0, result.output
    run = tmp_path / "run"
    check_regression_gap(run)
    rows = read_jsonl(run / "metrics.jsonl")
    evaluated = [r["epoch"] for r in rows if "val/loss" in r]
    assert evaluated == list(range(10, 301, 10))
    assert all("train_eval/loss" in r and "gap/loss" in r for r in rows if "val/loss" in r)
    summary = json.loads((run / "summary.json").read_text())
    # best/*_epoch has the evaluation's resolution, and the summary says what it is.
    assert summary["eval_every"] == 10
    best = min((r["val/loss"], r["epoch"]) for r in rows if "val/loss" in r)
    assert (summary["best"]["val/loss"], summary["best"]["val/loss_epoch"]) == best
    at_best = next(r for r in rows if r["epoch"] == best[1] and "gap/loss" in r)
    assert summary["best"]["gap/loss"] == at_best["gap/loss"] and summary["best"]["gap/loss_epoch"] == best[1]
    assert summary["best"]["train_eval/loss"] == min(r["train_eval/loss"] for r in rows if "train_eval/loss" in r)
    # 30 evaluations, but 300 epochs never reach the experiment's histogram cadence (400 steps): one line says so.
    lines = [line for line in result.output.splitlines() if "trainer.epochs=300 gives" in line]
    assert len(lines) == 1 and "no weight/gradient histogram" in lines[0] and "evaluation" not in lines[0], lines


def test_few_evaluations_are_announced_in_one_line(dropstudy, tmp_path):
    result = dropstudy("train", "trainer.epochs=30", "trainer.eval_every=10", "tracker.log_freq=10",
                       "tracker.mode=disabled", "hydra.run.dir=run")
    assert result.code == 0, result.output
    lines = [line for line in result.output.splitlines() if "trainer.epochs=30 gives" in line]
    assert len(lines) == 1 and "only 3 evaluations (trainer.eval_every=10" in lines[0], result.output
    assert "histogram" not in lines[0]


def test_regression_experiment_resolves_the_validation_curve():
    cfg = compose([])
    assert cfg.trainer.epochs // cfg.trainer.eval_every >= 100, "the best epoch to within 1% of the run"
    # Histograms keep their own cadence: 5 a run, not one per evaluation.
    assert cfg.tracker.log_freq == 400 and cfg.trainer.batch_size is None


def test_cifar10_gap_and_accuracy_gap_use_the_eval_mode_training_subset(dropstudy, tmp_path):
    result = dropstudy("train", *CIFAR, "hydra.run.dir=run")
    assert result.code == 0, result.output
    run = tmp_path / "run"
    model, cfg = last_model(run)
    data = load_cifar10(cfg.data, torch.device("cpu"), log=lambda _: None)
    with torch.no_grad():
        out = model(data.prepare(data.train_eval.inputs))
        train_loss = F.cross_entropy(out, data.train_eval.targets).item()
        train_acc = (out.argmax(1) == data.train_eval.targets).float().mean().item()
        val_out = model(data.prepare(data.val.inputs))
        val_loss = F.cross_entropy(val_out, data.val.targets).item()
        val_acc = (val_out.argmax(1) == data.val.targets).float().mean().item()
    row = last_evaluation(run)
    assert row["train_eval/loss"] == pytest.approx(train_loss, rel=1e-4)
    assert row["train_eval/acc"] == pytest.approx(train_acc, abs=1e-6)
    assert row["gap/loss"] == pytest.approx(val_loss - train_loss, rel=1e-3, abs=1e-5)
    assert row["gap/acc"] == pytest.approx(val_acc - train_acc, abs=1e-6)
    assert row["train/loss"] != pytest.approx(row["train_eval/loss"], rel=1e-3)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["gap/acc"] == row["gap/acc"] and summary["final"]["train_eval/acc"] == row["train_eval/acc"]
    assert summary["best"]["train_eval/acc"] == max(r["train_eval/acc"] for r in read_jsonl(run / "metrics.jsonl")
                                                    if "train_eval/acc" in r)


def test_cifar10_eval_subset_is_fixed_by_data_seed_and_the_size_of_val():
    def images(*overrides: str) -> tuple[set[bytes], set[bytes], int]:
        cfg = compose([*CIFAR, *overrides])
        data = load_cifar10(cfg.data, torch.device("cpu"), log=lambda _: None)
        rows = lambda split: {x.numpy().tobytes() for x in split.inputs}  # noqa: E731
        return rows(data.train_eval), rows(data.train), len(data.val)

    subset, train, n_val = images("seed=0", "data.seed=7")
    assert len(subset) == n_val == 64 and subset < train
    # Every seed of a study that shares the data (data.seed) evaluates the same images...
    assert images("seed=1", "data.seed=7")[0] == subset
    # ...and another data seed draws others.
    assert images("seed=0", "data.seed=8")[0] != subset


def test_batched_sweep_member_logs_the_same_gap(dropstudy, tmp_path):
    result = dropstudy("sweep", "model.dropout=0,0.5", *REGRESSION[1:], "hydra.sweep.dir=sw")
    assert result.code == 0, result.output
    member = next(p.parent for p in (tmp_path / "sw").glob("*/summary.json")
                  if json.loads(p.read_text())["dropout"] == 0.5)
    assert json.loads((member / "provenance.json").read_text())["batch"]["execution"] == "stacked"
    check_regression_gap(member)
