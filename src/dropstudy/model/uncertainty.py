"""MC dropout (Gal & Ghahramani 2016) and what is measured on its predictions.

`predictions` runs a model over a split: one deterministic pass in evaluation mode, or T
stochastic passes with the dropout sites on (`eval.mc_samples=T`), averaged. `mc_metrics`
turns the averaged predictions into the `val_mc/*` and `test_mc/*` metrics; `calibration` and
`predictive_entropy` serve those metrics and the reliability diagram.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dropstudy.data.datasets import Dataset, Split, batches
from dropstudy.model.dropout import drops_anything, mc_dropout

# Equal-width confidence bins, the usual choice since Guo et al. 2017 ("On calibration of
# modern neural networks"), so ECE values compare with the literature's.
ECE_BINS = 15


@dataclass
class Predictions:
    """Per example: regression outputs [N, out], or class probabilities [N, C]; `std` is their
    spread over the stochastic passes (None for a deterministic pass)."""

    mean: torch.Tensor
    std: torch.Tensor | None
    targets: torch.Tensor
    samples: int


def _output(out: torch.Tensor, classification: bool) -> torch.Tensor:
    # Classification averages probabilities, not logits: the predictive distribution is the
    # mean of the passes' distributions.
    return out.softmax(-1) if classification else out


@torch.no_grad()
def mc_forward(
    model: nn.Module, x: torch.Tensor, samples: int, classification: bool = False, one_draw_per_batch: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of `samples` passes over x with dropout on (masks drawn per
    example, or once per pass with `one_draw_per_batch`)."""
    with mc_dropout(model, one_draw_per_batch):
        return _passes(model, x, samples, classification)


def _passes(model: nn.Module, x: torch.Tensor, samples: int, classification: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`mc_forward`'s passes, inside `mc_dropout`."""
    if not drops_anything(model):
        # Every pass would be the same (no sites, or p=0 everywhere): one is enough.
        out = _output(model(x), classification)
        return out, torch.zeros_like(out)
    passes = torch.stack([_output(model(x), classification) for _ in range(samples)])
    return passes.mean(0), passes.std(0)


@torch.no_grad()
def predictions(model: nn.Module, data: Dataset, split: Split, batch_size: int, samples: int = 0) -> Predictions:
    """The model's predictions for every example of `split`: one pass in evaluation mode
    (samples=0), or the mean and spread of `samples` passes with dropout on. The batches draw
    their masks one after another from one fork of the random stream (each batch its own masks)."""
    classification = data.task == "classification"
    was_training = model.training
    means, stds = [], []
    with mc_dropout(model) if samples else nullcontext():
        if not samples:
            model.eval()
        for xb, _ in batches(split, batch_size):
            x = data.prepare(xb)
            if samples:
                mean, std = _passes(model, x, samples, classification)
                stds.append(std)
            else:
                mean = _output(model(x), classification)
            means.append(mean)
    model.train(was_training)
    return Predictions(torch.cat(means), torch.cat(stds) if stds else None, split.targets, samples)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H[p] = -Σ p log p per example, in nats (0·log 0 taken as 0)."""
    return torch.special.entr(probs).sum(-1)


@dataclass
class Calibration:
    """A reliability diagram's bins (confidence in (b/bins, (b+1)/bins]) and the expected
    calibration error: the count-weighted mean |accuracy - confidence| over the bins."""

    confidence: list[float]  # mean confidence of each bin's examples (nan for an empty bin)
    accuracy: list[float]
    count: list[int]
    ece: float


def calibration(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> Calibration:
    probs, targets = probs.detach().float().cpu(), targets.cpu()
    confidence, predicted = probs.max(1)
    correct = (predicted == targets).float()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(index, minlength=bins)
    confidence_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    # Σ_b (n_b/N)·|acc_b - conf_b| = Σ_b |correct_b - confidence_b| / N
    ece = ((correct_sum - confidence_sum).abs().sum() / len(targets)).item()
    per_bin = count.clamp_min(1).double()
    empty = count == 0
    return Calibration(
        confidence=(confidence_sum / per_bin).masked_fill(empty, float("nan")).tolist(),
        accuracy=(correct_sum / per_bin).masked_fill(empty, float("nan")).tolist(),
        count=count.tolist(),
        ece=ece,
    )


def mc_metrics(pred: Predictions, task: str) -> dict[str, float]:
    """loss (and acc) of the averaged prediction; for regression the mean predictive standard
    deviation, for classification the mean predictive entropy and the ECE."""
    if task == "regression":
        metrics = {"loss": F.mse_loss(pred.mean, pred.targets).item()}
        if pred.std is not None:
            metrics["std"] = pred.std.mean().item()
        return metrics
    # The loss of the predictive distribution itself: NLL of the averaged probabilities.
    log_probs = pred.mean.clamp_min(torch.finfo(pred.mean.dtype).tiny).log()
    return {
        "loss": F.nll_loss(log_probs, pred.targets).item(),
        "acc": (pred.mean.argmax(1) == pred.targets).float().mean().item(),
        "entropy": predictive_entropy(pred.mean).mean().item(),
        "ece": calibration(pred.mean, pred.targets).ece,
    }
