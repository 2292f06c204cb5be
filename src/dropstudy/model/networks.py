"""The networks of the studies, the regression MLP and the CIFAR-10 CNN, with their dropout sites;
and the per-layer weight measurements (norms) that training logs and constrains.

Modules are named (fc1, drop1, conv1, ...) so that histograms in W&B read
`gradients/fc1.weight` rather than `gradients/net.0.weight`, and metrics read
`dropout/p/net.drop1` and `weights/l2/net.fc1`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from omegaconf import DictConfig
from torch import nn

from dropstudy.config.checks import dropout_site_count
from dropstudy.model.dropout import make_dropout, site_rates


def _add_site(layers: OrderedDict[str, nn.Module], name: str, site: nn.Module | None) -> None:
    """Kind `none` gives no site module at all (rather than an identity), so no site is listed."""
    if site is not None:
        layers[name] = site


class MLP(nn.Module):
    """in -> hidden... -> out; ReLU then dropout after each hidden layer, none before the output;
    optionally dropout on the inputs."""

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        out_features: int,
        rates: list[float],
        kind: str = "inverted",
        input_p: float = 0.0,
    ):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if input_p > 0:
            _add_site(layers, "drop_in", make_dropout(kind, input_p, "on the inputs"))
        width = in_features
        for i, (size, p) in enumerate(zip(hidden, rates), start=1):
            layers[f"fc{i}"] = nn.Linear(width, size)
            layers[f"relu{i}"] = nn.ReLU()
            _add_site(layers, f"drop{i}", make_dropout(kind, p, f"after fc{i}"))
            width = size
        layers["out"] = nn.Linear(width, out_features)
        self.net = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Three 3x3 conv blocks (no padding; ReLU, 2x2 max-pool) to a 512-vector, then
    dropout, fc, ReLU, dropout, fc: the tutorial's network, with its two dropout sites.
    Optionally dropout on the input images and after each conv block (`conv_rates`)."""

    def __init__(
        self,
        channels: list[int],
        hidden: int,
        num_classes: int,
        rates: list[float],
        kind: str = "inverted",
        input_p: float = 0.0,
        conv_rates: list[float] | None = None,
    ):
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        if input_p > 0:
            _add_site(blocks, "drop_in", make_dropout(kind, input_p, "on the input pixels"))
        # The conv sites exist when any block asks for dropout, so a per-block list keeps its positions.
        conv_rates = conv_rates if conv_rates and any(p > 0 for p in conv_rates) else []
        width = 3
        for i, out in enumerate(channels, start=1):
            blocks[f"conv{i}"] = nn.Conv2d(width, out, kernel_size=3)
            blocks[f"relu{i}"] = nn.ReLU()
            blocks[f"pool{i}"] = nn.MaxPool2d(2)
            if conv_rates:
                site = make_dropout(kind, conv_rates[i - 1], f"after conv block {i}", feature_maps=True)
                _add_site(blocks, f"drop{i}", site)
            width = out
        self.features = nn.Sequential(blocks)
        self._feature_order = pool_before_relu(list(blocks))
        # 32 -> 30 -> 15 -> 13 -> 6 -> 4 -> 2: a 2x2 map of the last block's channels (512 values
        # for the default widths); measured rather than hard-coded so model.channels can change.
        # In eval mode: a conv dropout site must not draw a mask here, which would shift the random
        # stream that the fc weights below are initialised from.
        with torch.no_grad():
            flat = self.features.eval()(torch.zeros(1, 3, 32, 32)).numel()
        self.features.train()
        head: OrderedDict[str, nn.Module] = OrderedDict()
        _add_site(head, "drop1", make_dropout(kind, rates[0], "before fc1"))
        head["fc1"] = nn.Linear(flat, hidden)
        head["relu"] = nn.ReLU()
        _add_site(head, "drop2", make_dropout(kind, rates[1], "before fc2"))
        head["fc2"] = nn.Linear(hidden, num_classes)
        self.head = nn.Sequential(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = self.features._modules
        for name in self._feature_order:
            x = modules[name](x)
        # torch.flatten, not view: it also works on channels_last tensors.
        return self.head(torch.flatten(x, 1))


def pool_before_relu(names: list[str]) -> tuple[str, ...]:
    """The blocks' order for the forward pass: every `reluN` directly followed by `poolN` runs after
    it instead. Max-pool then ReLU gives the same numbers as ReLU then max-pool (ReLU is monotonic,
    so it commutes with max; the gradients too: max-pool picks the same element either way, and
    where the window's max is not positive ReLU's gradient is zero in both) on a quarter of the
    values: a CIFAR-10 training step spends a sixth of its time less on the CPU in fp32."""
    order = list(names)
    for i in range(len(order) - 1):
        if order[i].startswith("relu") and order[i + 1] == "pool" + order[i][len("relu"):]:
            order[i], order[i + 1] = order[i + 1], order[i]
    return tuple(order)


def build_model(cfg: DictConfig) -> nn.Module:
    rates = site_rates(cfg.dropout, dropout_site_count(cfg))
    kind, input_p = cfg.dropout_kind, float(cfg.input_dropout)
    if cfg.name == "mlp":
        return MLP(cfg.in_features, list(cfg.hidden), cfg.out_features, rates, kind, input_p)
    if cfg.name == "cnn":
        conv_rates = site_rates(cfg.conv_dropout, len(cfg.channels))
        return CNN(list(cfg.channels), cfg.hidden, cfg.num_classes, rates, kind, input_p, conv_rates)
    raise ValueError(f"model.name={cfg.name!r}: use mlp or cnn")


# --------------------------------------------------------------------------- weights


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
    """(name, layer) for every layer with a weight matrix: one row (one filter) per unit."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def weight_norms(model: nn.Module) -> dict[str, float]:
    """The L2 (Frobenius) norm of each layer's weights, as metrics `weights/l2/<layer>`: dropout's
    shrinking effect on the weights, layer by layer. Biases are not included."""
    layers = weight_layers(model)
    norms = torch.stack([layer.weight.norm() for _, layer in layers]).tolist()  # one host sync
    return {f"weights/l2/{name}": norm for (name, _), norm in zip(layers, norms)}
