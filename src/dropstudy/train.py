"""The training loop: minibatch steps (with the max-norm constraint after each), the dropout
schedule applied every epoch, evaluation every `eval_every` epochs (deterministic, MC dropout,
weight norms), checkpoints, and how the run ended (finished, diverged, interrupted).

It writes every metric row to the run directory first and then hands it to the tracker; it
knows nothing of W&B beyond the `Tracker` interface.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dropstudy.checkpoint import RunDirError
from dropstudy.console import TrainingProgress
from dropstudy.data import Dataset, Split, TrainBatches, batches
from dropstudy.dropout import DropoutSchedule
from dropstudy.models import weight_layers, weight_norms
from dropstudy.rundir import RunDir
from dropstudy.runtime import FastPaths, Interrupted, signals_interrupt_training
from dropstudy.tracking import Tracker
from dropstudy.uncertainty import Predictions, mc_metrics, predictions


log = logging.getLogger("dropstudy")


def _exit_now(signum: int, frame: Any) -> None:
    os.write(2, f"\n{signal.Signals(signum).name} again: exiting now\n".encode())
    os._exit(128 + signum)


@dataclass
class Outcome:
    status: str  # finished | diverged | interrupted
    epoch: int  # last completed epoch
    reason: str | None = None
    exit_code: int = 0  # 0, or 130/143 when interrupted by SIGINT/SIGTERM, 1 when diverged
    final: dict[str, float] = field(default_factory=dict)  # last value of every metric
    best: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    test_mc: Predictions | None = None  # MC-dropout predictions on the test set, for figures


def loss_function(task: str) -> Callable[..., torch.Tensor]:
    return F.mse_loss if task == "regression" else F.cross_entropy


def make_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """The max-norm constraint of Srivastava et al. 2014: every unit's incoming weight vector (a
    row of a Linear weight, a whole filter of a Conv2d) whose L2 norm exceeds max_norm is scaled
    back onto the ball of radius max_norm; the others are left alone. Biases are not constrained."""
    for _, layer in weight_layers(model):
        layer.weight.renorm_(2, 0, max_norm)


@torch.inference_mode()
def evaluate(
    model: nn.Module, data: Dataset, split: Split, batch_size: int, fast: FastPaths | None = None
) -> dict[str, float]:
    """Mean loss (and accuracy) over a split, in evaluation mode (dropout off), without autograd,
    in batches of trainer.eval_batch_size; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_fn = loss_function(data.task)
    loss_sum = torch.zeros((), device=split.targets.device)
    correct = torch.zeros((), device=split.targets.device)
    for xb, yb in batches(split, batch_size):
        if fast is None:
            out = model(data.prepare(xb))
        else:
            with fast.autocast():
                out = model(fast.inputs(data.prepare(xb))).float()
        loss_sum += loss_fn(out, yb, reduction="sum") / (out.shape[1] if data.task == "regression" else 1)
        if data.task == "classification":
            correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    metrics = {"loss": (loss_sum / len(split)).item()}
    if data.task == "classification":
        metrics["acc"] = (correct / len(split)).item()
    return metrics


def rng_states(loader: TrainBatches) -> dict[str, Any]:
    """Every generator a run draws from: restoring them all makes a resumed run exact."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **loader.state(),  # "shuffle" (and "augment"): the batch order and crops
    }


def restore_rng_states(states: dict[str, Any], loader: TrainBatches) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    loader.load_state(states)


def logs_row(epoch: int, log_every: int, evaluated: bool, diverging: bool) -> bool:
    """Whether an epoch gets a metrics row (metrics.jsonl and W&B): every `trainer.log_every`-th
    epoch, every evaluation (the last epoch is one) and an epoch whose loss stopped being finite."""
    return evaluated or diverging or epoch % log_every == 0


def _clone_tensors(tree: Any) -> Any:
    """`tree` (dicts and lists of tensors and plain values, as state_dicts are) with every tensor
    cloned and every container rebuilt, so nothing in it aliases the live state."""
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone_tensors(v) for v in tree)
    return tree


class NonFiniteLoss(FloatingPointError):
    """trainer.on_nan=raise: a NaN/inf loss stops the run with an exception."""


class Trainer:
    """Trains one model on one dataset; `fit` returns how it ended.

    At every epoch boundary it keeps an in-memory copy of the whole training state (the
    models are small). A checkpoint always holds such a boundary state, never a half-done
    epoch, so a run resumed from it continues exactly as if it had not stopped.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Dataset,
        trainer_cfg: Any,
        seed: int,
        run_dir: RunDir,
        tracker: Tracker,
        label: str,
        checkpoint_extra: dict[str, Any],
        schedule: DropoutSchedule = DropoutSchedule(),
        max_norm: float | None = None,
        mc_samples: int = 0,
        fast: FastPaths | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.cfg = trainer_cfg
        self.run_dir = run_dir
        self.tracker = tracker
        self.label = label
        self.checkpoint_extra = checkpoint_extra
        self.schedule = schedule
        self.max_norm = max_norm
        self.mc_samples = mc_samples
        self.loss_fn = loss_function(data.task)
        self.fast = fast or FastPaths(data.train.targets.device)
        # What the loop calls: the model, or its torch.compile wrapper (same parameters).
        self.net = self.fast.forward(model)
        # Shuffling (and augmentation) have their own generators, so the batch order depends on
        # the seed alone and not on how many random numbers dropout drew.
        self.loader = TrainBatches(data.train, trainer_cfg.batch_size, seed, augment=data.augment)
        # Seconds spent in each part of fit(), for summary.json: where the time goes.
        self.timings = {"train": 0.0, "eval": 0.0, "log": 0.0, "checkpoint": 0.0}
        self.rows: list[dict[str, Any]] = []
        self.start_epoch = 1
        self.skipped_steps = 0
        self._boundary: dict[str, Any] | None = None
        self._snapshot(0)

    @property
    def steps_per_epoch(self) -> int:
        bs = self.cfg.batch_size
        return 1 if bs is None else math.ceil(len(self.data.train) / bs)

    @property
    def checkpoint_every(self) -> int:
        return self.cfg.checkpoint_every or self.cfg.eval_every

    def log(self, row: dict[str, Any]) -> None:
        """The one place a metric row goes: metrics.jsonl first, then the tracker. The row's
        index is its W&B step, so a resumed run continues the same step sequence."""
        start = time.perf_counter()
        step = len(self.rows)
        self.rows.append(row)
        self.run_dir.append_metrics(row)
        self.tracker.log(row, step=step)
        self.timings["log"] += time.perf_counter() - start

    # -- state ------------------------------------------------------------------------------
    def _snapshot(self, epoch: int) -> None:
        """The training state after `epoch`, its tensors cloned (training goes on mutating the
        live ones). Taken every epoch, so it must be cheap: the RNG getters already return
        copies, and only tensors are cloned (a deepcopy of the whole dict cost 2 ms an epoch,
        40% of a regression run, mostly walking Python's 625-int random state)."""
        self._boundary = {
            "epoch": epoch,
            "model": _clone_tensors(self.model.state_dict()),
            "optimizer": _clone_tensors(self.optimizer.state_dict()),
            "scheduler": None,  # no learning-rate schedule in these studies
            "rng": rng_states(self.loader),
            "skipped_steps": self.skipped_steps,
        }

    def checkpoint(self) -> None:
        """Write the last epoch-boundary state to checkpoints/last.pt. A failed write (disk
        full) leaves the previous checkpoint as it was and ends the run as failed: training on
        without checkpoints would make an interruption cost the whole run."""
        start = time.perf_counter()
        state = {**self._boundary, "tracker_run_id": self.tracker.run_id, **self.checkpoint_extra}
        self.run_dir.save_checkpoint(state)
        self.timings["checkpoint"] += time.perf_counter() - start

    def load_state(self, state: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Continue from a checkpoint: the metrics logged up to its epoch, then its state."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        try:
            restore_rng_states(state["rng"], self.loader)
        except RuntimeError as exc:  # a generator state of another kind (CPU vs CUDA): another device type
            raise RunDirError(
                f"{self.run_dir.checkpoints / 'last.pt'}: its batch-order generator was drawn on another kind of "
                f"device than {self.data.train.targets.device.type} ({exc}); resume it on the device type it "
                "started on (device=...)."
            ) from exc
        self.skipped_steps = state.get("skipped_steps", 0)
        self.rows = [r for r in rows if r["epoch"] <= state["epoch"] and not any(k.startswith("test/") for k in r)]
        self.start_epoch = state["epoch"] + 1
        self._snapshot(state["epoch"])

    # -- the loop ---------------------------------------------------------------------------
    def train_epoch(self, progress: TrainingProgress) -> dict[str, float]:
        model, data, fast = self.model, self.data, self.fast
        model.train()
        # Accumulated on the device and read once per epoch: no host sync per step.
        loss_sum = torch.zeros((), device=data.train.targets.device)
        correct = torch.zeros((), device=data.train.targets.device)
        counted = torch.zeros((), device=data.train.targets.device)
        skip_bad = self.cfg.on_nan == "skip"
        skipped = torch.zeros((), dtype=torch.long, device=data.train.targets.device)
        for xb, yb in self.loader:
            with fast.autocast():
                out = self.net(fast.inputs(data.prepare(xb)))
                loss = self.loss_fn(out, yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if skip_bad:
                # on_nan=skip checks every step (a sync per step; the default `stop` needs none).
                if not torch.isfinite(loss):
                    skipped += 1
                    progress.advance()
                    continue
            self.optimizer.step()
            if self.max_norm is not None:
                apply_max_norm(model, self.max_norm)
            loss_sum += loss.detach() * len(yb)
            counted += len(yb)
            if data.task == "classification":
                correct += (out.detach().argmax(1) == yb).sum()
            progress.advance()
        metrics = {"train/loss": (loss_sum / counted).item() if counted.item() else float("nan")}
        if data.task == "classification":
            metrics["train/acc"] = (correct / counted.clamp(min=1)).item()
        if skip_bad:
            self.skipped_steps += int(skipped.item())
            metrics["train/skipped_steps"] = self.skipped_steps
        return metrics

    def evaluation(self, split: Split, name: str, outcome: Outcome) -> dict[str, float]:
        """`<name>/loss` (and acc) in evaluation mode, and with eval.mc_samples the same for the
        MC-dropout average as `<name>_mc/*`."""
        start = time.perf_counter()
        results = evaluate(self.net, self.data, split, self.cfg.eval_batch_size, self.fast)
        metrics = {f"{name}/{k}": v for k, v in results.items()}
        if self.mc_samples:
            pred = predictions(self.model, self.data, split, self.cfg.eval_batch_size, self.mc_samples)
            metrics.update({f"{name}_mc/{k}": v for k, v in mc_metrics(pred, self.data.task).items()})
            if name == "test":
                outcome.test_mc = pred
        self.timings["eval"] += time.perf_counter() - start
        return metrics

    def fit(self) -> Outcome:
        epochs, eval_every = self.cfg.epochs, self.cfg.eval_every
        outcome = Outcome(status="finished", epoch=self.start_epoch - 1, rows=self.rows)
        with signals_interrupt_training(), TrainingProgress(
            self.label, epochs * self.steps_per_epoch, epochs
        ) as progress:
            progress.advance((self.start_epoch - 1) * self.steps_per_epoch)
            try:
                for epoch in range(self.start_epoch, epochs + 1):
                    rates = self.schedule.apply(self.model, epoch)  # the p this epoch trains with
                    start = time.perf_counter()
                    row: dict[str, Any] = {"epoch": epoch, **self.train_epoch(progress)}
                    row["lr"] = self.optimizer.param_groups[0]["lr"]
                    seconds = time.perf_counter() - start
                    self.timings["train"] += seconds
                    row["perf/samples_per_s"] = len(self.data.train) / seconds
                    row.update(rates)
                    evaluated = epoch % eval_every == 0 or epoch == epochs
                    if evaluated:
                        row.update(self.evaluation(self.data.val, "val", outcome))
                        row["gap/loss"] = row["val/loss"] - row["train/loss"]
                        row.update(weight_norms(self.model))
                    bad = [k for k in ("train/loss", "val/loss") if k in row and not math.isfinite(row[k])]
                    if logs_row(epoch, self.cfg.log_every, evaluated, diverging=bool(bad)):
                        self.log(row)
                    progress.epoch_done(row, evaluated)
                    if bad:
                        outcome.status, outcome.exit_code = "diverged", 1
                        outcome.reason = f"{bad[0]} became {row[bad[0]]} at epoch {epoch}"
                        outcome.epoch = epoch
                        self.tracker.set_summary({"diverged/epoch": epoch, "diverged/metric": bad[0]})
                        self.checkpoint()  # the last good state, from before the bad epoch
                        if self.cfg.on_nan == "raise":
                            raise NonFiniteLoss(outcome.reason)
                        break
                    outcome.epoch = epoch
                    self._snapshot(epoch)
                    if epoch % self.checkpoint_every == 0 or epoch == epochs:
                        self.checkpoint()
            except KeyboardInterrupt as exc:
                signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
                # A second Ctrl-C from here on exits at once; last.pt is only ever replaced by
                # a rename, so it stays the last complete checkpoint whatever happens.
                signal.signal(signal.SIGINT, _exit_now)
                signal.signal(signal.SIGTERM, _exit_now)
                outcome.status, outcome.exit_code = "interrupted", 128 + int(signum)
                outcome.epoch = self._boundary["epoch"]  # what the checkpoint holds
                outcome.reason = f"{signal.Signals(signum).name} during epoch {outcome.epoch + 1} of {epochs}"
                self.checkpoint()
                return conclude(outcome)
        if outcome.status == "finished":
            self.log({"epoch": outcome.epoch, **self.evaluation(self.data.test, "test", outcome)})
        return conclude(outcome)


def conclude(outcome: Outcome) -> Outcome:
    """Fill in the outcome's final value of every metric and the best ones, from its rows."""
    for row in outcome.rows:
        for key, value in row.items():
            if key != "epoch":
                outcome.final[key] = value
    for key, pick in (("val/loss", min), ("val/acc", max), ("train/loss", min), ("val_mc/loss", min),
                      ("val_mc/acc", max)):
        points = [(row[key], row["epoch"]) for row in outcome.rows if key in row and math.isfinite(row[key])]
        if points:
            value, epoch = pick(points, key=lambda p: p[0])
            outcome.best[key] = value
            outcome.best[f"{key}_epoch"] = epoch
    return outcome
