"""What the run engine drives: a *backend* trains M >= 1 members in lockstep, one epoch at a
time, evaluates them and gives or takes each member's state. `Single` is one nn.Module (M = 1,
what `dropstudy train` runs); `vectorized.StackedMLPBackend` is the batched regression sweep.

The engine (engine.py) owns everything around an epoch: cadence, rows, checkpoints,
divergence, interrupts. A backend owns the model(s), the optimizer(s), the batch order and the
dropout masks, and nothing else.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn

from dropstudy.rundir import RunDirError
from dropstudy.data import Dataset
from dropstudy.dropout import DropoutSchedule, sites
from dropstudy.models import weight_norms
from dropstudy.runtime import FastPaths
from dropstudy.train import (
    apply_max_norm,
    clone_tensors,
    evaluate,
    loss_function,
    restore_rng_states,
    rng_states,
)
from dropstudy.uncertainty import Predictions, mc_metrics, predictions


# The splits MC-dropout evaluation (eval.mc_samples) runs on.
MC_SPLITS = ("val", "test")


class Backend(Protocol):
    """M >= 1 members trained in lockstep, one epoch at a time. Member i is exactly what
    `dropstudy train` with member i's config would train (same initial weights from its seed,
    same batch order from its seed, its own dropout p, optimizer state, max-norm, schedule)."""

    members: int
    steps_per_epoch: int

    def set_epoch(self, epoch: int) -> list[dict[str, float]]:
        """Apply each member's dropout schedule for `epoch`; per member the rates in force,
        {"dropout/p/<site name>": p, ...}."""

    def train_epoch(self, progress: Any) -> list[dict[str, float]]:
        """One pass over the training data for every member (progress.advance(1) per step); per
        member {"train/loss", "train/acc" (classification), "train/skipped_steps" (on_nan=skip)}."""

    def evaluate(self, split: str) -> list[dict[str, float]]:
        """A split of the Dataset ("val", "test", or "train_eval": the training data the engine
        evaluates beside val) in evaluation mode; per member {f"{split}/loss", f"{split}/acc"} and,
        with eval.mc_samples, for val and test also {f"{split}_mc/..."}."""

    def weight_norms(self) -> list[dict[str, float]]:
        """Per member models.weight_norms of its model."""

    def histogram_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's "parameters/<name>" and "gradients/<name>" from the last step."""

    def member_state(self, i: int) -> dict[str, Any]:
        """Member i's checkpoint body {"model", "optimizer", "rng", "skipped_steps"} in the
        layout `dropstudy train` writes; cloned, safe to keep while training goes on."""

    def load_member_state(self, i: int, state: dict[str, Any]) -> None: ...

    def shared_state(self) -> dict[str, Any]:
        """What the members share (e.g. the generator their masks come from); {} for Single."""

    def load_shared_state(self, state: dict[str, Any]) -> None: ...

    def member_model(self, i: int) -> nn.Module:
        """A plain nn.Module holding member i's current weights (figures, calibration)."""


class Frozen:
    """Every member's state at one epoch boundary: what a checkpoint is written from. A backend
    may offer a cheaper `snapshot()` returning an object with the same two methods."""

    def __init__(self, backend: Backend):
        self.states = [backend.member_state(i) for i in range(backend.members)]
        self.shared = backend.shared_state()

    def member_state(self, i: int) -> dict[str, Any]:
        return self.states[i]

    def shared_state(self) -> dict[str, Any]:
        return self.shared


def snapshot(backend: Backend) -> Any:
    """The backend's state now, detached from the live tensors training goes on mutating."""
    take = getattr(backend, "snapshot", None)
    return take() if take is not None else Frozen(backend)


class Single:
    """One nn.Module on one dataset: the training loop of `dropstudy train`.

    `net` is what the loop calls: the model, or its torch.compile wrapper (same parameters).
    Shuffling (and augmentation) have their own generators, so the batch order depends on the
    seed alone and not on how many random numbers dropout drew.
    """

    members = 1

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, cfg: Any,
                 schedule: DropoutSchedule = DropoutSchedule(), fast: FastPaths | None = None):
        self.model, self.optimizer, self.data = model, optimizer, data
        self.trainer = cfg.trainer
        self.max_norm = cfg.optim.max_norm
        self.mc_samples = cfg.eval.mc_samples
        self.schedule = schedule
        self.loss_fn = loss_function(data.task)
        self.fast = fast or FastPaths(data.train.targets.device)
        self.net = self.fast.forward(model)
        self.loader = data.train_batches(cfg.trainer.batch_size, cfg.seed)
        self.skipped_steps = 0
        self.sites = sites(model)  # looked up once: the schedule sets their p every epoch
        # MC-dropout predictions of the last evaluation of each split, for the calibration figure.
        self.mc_predictions: dict[str, list[Predictions]] = {}

    @property
    def steps_per_epoch(self) -> int:
        bs = self.trainer.batch_size
        return 1 if bs is None else math.ceil(len(self.data.train) / bs)

    def set_epoch(self, epoch: int) -> list[dict[str, float]]:
        return [self.schedule.apply_to(self.sites, epoch)]

    def train_epoch(self, progress: Any) -> list[dict[str, float]]:
        model, data, fast = self.model, self.data, self.fast
        if not model.training:  # every evaluation puts the whole model back as it found it
            model.train()
        # Summed on the device in two in-place ops a step and read in one host copy per epoch.
        device = data.train.targets.device
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
        counted, skipped = 0, 0
        classification = data.task == "classification"
        skip_bad = self.trainer.on_nan == "skip"
        for xb, yb in self.loader:
            with fast.autocast():
                out = self.net(fast.inputs(data.prepare(xb)))
                loss = self.loss_fn(out, yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # on_nan=skip checks every step (a sync per step; the default `stop` needs none).
            if skip_bad and not torch.isfinite(loss):
                skipped += 1
                progress.advance()
                continue
            self.optimizer.step()
            if self.max_norm is not None:
                apply_max_norm(model, self.max_norm)
            with torch.no_grad():
                loss_sum.add_(loss, alpha=len(yb))
                if classification:
                    correct.add_(torch.count_nonzero(out.argmax(1) == yb))
            counted += len(yb)
            progress.advance()
        mean_loss, accuracy = (torch.stack([loss_sum, correct.to(loss_sum.dtype)]) / max(counted, 1)).tolist()
        metrics = {"train/loss": mean_loss if counted else float("nan")}
        if classification:
            metrics["train/acc"] = accuracy
        if skip_bad:
            self.skipped_steps += skipped
            metrics["train/skipped_steps"] = self.skipped_steps
        return [metrics]

    def evaluate(self, split: str) -> list[dict[str, float]]:
        """`<split>/loss` (and acc) in evaluation mode, and with eval.mc_samples the same for the
        MC-dropout average as `<split>_mc/*` (not for train_eval, where it would double the cost)."""
        data = getattr(self.data, split)
        results = evaluate(self.net, self.data, data, self.trainer.eval_batch_size, self.fast)
        metrics = {f"{split}/{k}": v for k, v in results.items()}
        if self.mc_samples and split in MC_SPLITS:
            pred = predictions(self.model, self.data, data, self.trainer.eval_batch_size, self.mc_samples)
            metrics.update({f"{split}_mc/{k}": v for k, v in mc_metrics(pred, self.data.task).items()})
            self.mc_predictions[split] = [pred]
        return [metrics]

    def weight_norms(self) -> list[dict[str, float]]:
        return [weight_norms(self.model)]

    def histogram_tensors(self, i: int) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, param in self.model.named_parameters():
            tensors[f"parameters/{name}"] = param
            if param.grad is not None:
                tensors[f"gradients/{name}"] = param.grad
        return tensors

    def member_state(self, i: int) -> dict[str, Any]:
        """Taken every epoch, so it must be cheap: the RNG getters already return copies, and
        only tensors are cloned (a deepcopy of the whole dict cost 2 ms an epoch, 40% of a
        regression run, mostly walking Python's 625-int random state)."""
        return {
            "model": clone_tensors(self.model.state_dict()),
            "optimizer": clone_tensors(self.optimizer.state_dict()),
            "scheduler": None,  # no learning-rate schedule in these studies
            "rng": rng_states(self.loader),
            "skipped_steps": self.skipped_steps,
        }

    def load_member_state(self, i: int, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        try:
            restore_rng_states(state["rng"], self.loader)
        except RuntimeError as exc:  # a generator state of another kind (CPU vs CUDA): another device type
            raise RunDirError(
                f"checkpoints/last.pt: its batch-order generator was drawn on another kind of device than "
                f"{self.data.train.targets.device.type} ({exc}); resume it on the device type it started on "
                "(device=...)."
            ) from exc
        self.skipped_steps = state.get("skipped_steps", 0)

    def shared_state(self) -> dict[str, Any]:
        return {}

    def load_shared_state(self, state: dict[str, Any]) -> None:
        pass

    def member_model(self, i: int) -> nn.Module:
        return self.model
