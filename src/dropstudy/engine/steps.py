"""The pieces of training the backend shares between its executions: the loss, the optimizer,
the max-norm constraint, and evaluation of one model over a split. The loop itself is loop.py's."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dropstudy.data.datasets import Dataset, Split, batches
from dropstudy.engine.runtime import FastPaths
from dropstudy.model.networks import weight_layers


def loss_function(task: str) -> Callable[..., torch.Tensor]:
    return F.mse_loss if task == "regression" else F.cross_entropy


def make_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    name = getattr(cfg.name, "value", cfg.name)  # an Enum member once the schema has typed it
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                fused=fused_adam(next(model.parameters()).device))
    raise ValueError(f"optim.name={name!r}: no such optimizer; use sgd or adam")


def fused_adam(device: torch.device) -> bool | None:
    """Whether Adam runs as one fused kernel over all parameters on `device`: on CUDA and on a CPU,
    where its step is faster than the per-parameter loop for the CNN (BENCHMARKS.md; it is within
    float rounding of it, tests/engine/test_performance.py); None (torch's default) elsewhere."""
    return True if device.type in ("cuda", "cpu") else None


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """The max-norm constraint of Srivastava et al. 2014: every unit's incoming weight vector (a
    row of a Linear weight, a whole filter of a Conv2d) whose L2 norm exceeds max_norm is scaled
    back onto the ball of radius max_norm; the others are left alone. Biases are not constrained."""
    for _, layer in weight_layers(model):
        layer.weight.renorm_(2, 0, max_norm)


@torch.no_grad()  # not inference_mode, under which autocast keeps no bf16 weight between batches
def evaluate(
    model: nn.Module, data: Dataset, split: Split, batch_size: int, fast: FastPaths | None = None
) -> dict[str, float]:
    """Mean loss (and accuracy) over a split, in evaluation mode (dropout off), without autograd,
    in batches of trainer.eval_batch_size, under one autocast block; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_fn = loss_function(data.task)
    loss_sum = torch.zeros((), device=split.device)
    correct = torch.zeros((), device=split.device)
    with nullcontext() if fast is None else fast.autocast(reuse_casts=True):
        for xb, yb in batches(split, batch_size):
            if fast is None:
                out = model(data.prepare(xb))
            else:
                out = model(fast.inputs(data.prepare(xb))).float()
            loss_sum += loss_fn(out, yb, reduction="sum") / (out.shape[1] if data.task == "regression" else 1)
            if data.task == "classification":
                correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    loss, acc = (torch.stack([loss_sum, correct]) / len(split)).tolist()
    return {"loss": loss, "acc": acc} if data.task == "classification" else {"loss": loss}


def clone_tensors(tree: Any) -> Any:
    """`tree` (dicts and lists of tensors and plain values, as state_dicts are) with every tensor
    cloned and every container rebuilt, so nothing in it aliases the live state."""
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: clone_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(clone_tensors(v) for v in tree)
    return tree
