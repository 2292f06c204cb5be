"""What a run's figures show, computed from its model: the regression fit over a dense grid (with the
MC-dropout band), and the calibration bins and entropies."""

from __future__ import annotations

from typing import Any

import torch

from dropstudy.data.datasets import Dataset
from dropstudy.engine.outcome import Outcome
from dropstudy.model.uncertainty import calibration, mc_forward, predictions, predictive_entropy
from dropstudy.report import plots


@torch.no_grad()
def regression_fit_curve(model: torch.nn.Module, data: Dataset, label: str, mc_samples: int = 0) -> plots.FitCurve:
    """The model's prediction (evaluation mode) over a dense x grid, and its MSE on both sets;
    with mc_samples, also the MC-dropout mean and standard deviation over the grid."""
    model.eval()
    device = data.train.inputs.device
    xs = torch.linspace(-1.0, 1.0, 200, device=device).unsqueeze(1)
    train_mse = torch.mean((model(data.train.inputs) - data.train.targets) ** 2).item()
    test_mse = torch.mean((model(data.test.inputs) - data.test.targets) ** 2).item()
    curve = plots.FitCurve(label, xs.squeeze(1).tolist(), model(xs).squeeze(1).tolist(), train_mse, test_mse)
    if mc_samples:
        # One thinned network per pass: each sample is a whole function of x, so the band is
        # smooth rather than 200 independent estimates side by side.
        mean, std = mc_forward(model, xs, mc_samples, one_draw_per_batch=True)
        curve.mc_mean, curve.mc_std = mean.squeeze(1).tolist(), std.squeeze(1).tolist()
        curve.mc_samples = mc_samples
    return curve


def calibration_values(
    model: torch.nn.Module, data: Dataset, outcome: Outcome, batch_size: int
) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, float]]:
    """Reliability bins and predictive entropies on the test set, deterministic vs MC dropout
    (what plots.calibration draws), and the two expected calibration errors."""
    mc_name = f"MC dropout (T={outcome.test_mc.samples})"
    named = {"deterministic": predictions(model, data, data.test, batch_size), mc_name: outcome.test_mc}
    bins = {name: calibration(p.mean, p.targets) for name, p in named.items()}
    entropies = {name: predictive_entropy(p.mean).cpu().tolist() for name, p in named.items()}
    return bins, entropies, {"test/ece": bins["deterministic"].ece, "test_mc/ece": bins[mc_name].ece}


def split_points(split) -> tuple[list[float], list[float]]:
    return split.inputs.squeeze(1).tolist(), split.targets.squeeze(1).tolist()
