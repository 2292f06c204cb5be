"""The networks of the studies: the regression MLP and the CIFAR-10 CNN.

Modules are named (fc1, drop1, conv1, ...) so that histograms in W&B read
`gradients/fc1.weight` rather than `gradients/net.0.weight`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from omegaconf import DictConfig
from torch import nn

from dropstudy.config import dropout_site_count
from dropstudy.dropout import make_dropout, site_rates


class MLP(nn.Module):
    """in -> hidden... -> out; ReLU then dropout after each hidden layer, none before the output."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int, rates: list[float]):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_features
        for i, (size, p) in enumerate(zip(hidden, rates), start=1):
            layers[f"fc{i}"] = nn.Linear(width, size)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"drop{i}"] = make_dropout(p)
            width = size
        layers["out"] = nn.Linear(width, out_features)
        self.net = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Three 3x3 conv blocks (no padding; ReLU, 2x2 max-pool) to a 512-vector, then
    dropout, fc, ReLU, dropout, fc: the tutorial's network, with its two dropout sites."""

    def __init__(self, channels: list[int], hidden: int, num_classes: int, rates: list[float]):
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        width = 3
        for i, out in enumerate(channels, start=1):
            blocks[f"conv{i}"] = nn.Conv2d(width, out, kernel_size=3)
            blocks[f"relu{i}"] = nn.ReLU()
            blocks[f"pool{i}"] = nn.MaxPool2d(2)
            width = out
        self.features = nn.Sequential(blocks)
        # 32 -> 30 -> 15 -> 13 -> 6 -> 4 -> 2: a 2x2 map of the last block's channels (512 values
        # for the default widths); measured rather than hard-coded so model.channels can change.
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 3, 32, 32)).numel()
        self.head = nn.Sequential(
            OrderedDict(
                drop1=make_dropout(rates[0]),
                fc1=nn.Linear(flat, hidden),
                relu=nn.ReLU(),
                drop2=make_dropout(rates[1]),
                fc2=nn.Linear(hidden, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.flatten, not view: it also works on channels_last tensors.
        return self.head(torch.flatten(self.features(x), 1))


def build_model(cfg: DictConfig) -> nn.Module:
    rates = site_rates(cfg.dropout, dropout_site_count(cfg))
    if cfg.name == "mlp":
        return MLP(cfg.in_features, list(cfg.hidden), cfg.out_features, rates)
    if cfg.name == "cnn":
        return CNN(list(cfg.channels), cfg.hidden, cfg.num_classes, rates)
    raise ValueError(f"model.name={cfg.name!r}: use mlp or cnn")
