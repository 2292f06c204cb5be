"""Dropout itself: how a configured rate becomes one p per dropout site, and the layer drawn there.

`p` is always the probability of *dropping* a unit (PyTorch's convention); the keep
probability is 1 - p. Today every site is PyTorch's inverted dropout (`torch.nn.Dropout`:
kept units are scaled by 1/(1-p) in training, identity at evaluation); this module is where
other formulations belong.
"""

from __future__ import annotations

from typing import Any, Sequence

from omegaconf import ListConfig
from torch import nn


def site_rates(dropout: Any, n_sites: int) -> list[float]:
    """`model.dropout` as one p per site: a single p is used at every site."""
    if isinstance(dropout, (list, tuple, ListConfig)):
        if len(dropout) != n_sites:
            raise ValueError(f"model.dropout has {len(dropout)} values for {n_sites} dropout sites")
        return [float(p) for p in dropout]
    return [float(dropout)] * n_sites


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p)


def describe_sites(model: nn.Module) -> list[str]:
    """'<module name>: p=<p>' for every dropout site, in forward order."""
    return [f"{name}: p={m.p:g}" for name, m in model.named_modules() if isinstance(m, nn.Dropout)]


def arm_label(dropout: Any) -> str:
    """A short name for a dropout setting, used for job types and arm directories."""
    if isinstance(dropout, (list, tuple, ListConfig)):
        return "dropout-" + "-".join(f"{float(p):g}" for p in dropout)
    return f"dropout-{float(dropout):g}"


def mean_rate(dropout: Any) -> float:
    values: Sequence[float] = dropout if isinstance(dropout, (list, tuple, ListConfig)) else [dropout]
    return sum(float(p) for p in values) / len(values)
