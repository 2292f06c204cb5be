"""Dropout itself: the formulations a site can use, how configured rates become one p per site,
how a schedule changes p over epochs, and switching the sites on for MC-dropout evaluation.

`p` is always the probability of *dropping* a unit (PyTorch's convention); the keep
probability is 1 - p. The kinds (`model.dropout_kind`):

    inverted  keep with probability 1-p and scale kept units by 1/(1-p) in training; identity
              at evaluation. What torch.nn.Dropout does, and the default.
    vanilla   the original formulation (Srivastava et al. 2014): drop without rescaling in
              training; at evaluation multiply the activations by the keep probability 1-p
              (equivalently the outgoing weights).
    gaussian  multiply every unit by noise drawn from N(1, p/(1-p)) in training (same mean and
              variance as inverted dropout's multiplier); identity at evaluation (2014, section 10).
    spatial   whole feature maps dropped (inverted, as Dropout2d) at the CNN's conv sites; the
              sites on vectors (inputs, fc layers) then drop single units, inverted.
    none      no dropout sites at all.

Every site is a `SiteDropout` module: models.py asks `make_dropout` for one wherever its
architecture has a dropout site, and everything else (logging the sites, schedules, MC
dropout) finds them by that type.

Every kind is implemented once, in `apply_dropout`, which takes p as a Python float (torch's
own kernels where they exist, what a sequential member uses) or as a tensor. The tensor form is
what stacked members train with: a site's `drop_rate` passes its `rate` buffer, which
`torch.func.stack_module_state` stacks into one p per member of the backend
(engine/backend.py), so under `vmap(..., randomness="different")` every member draws its own mask
with its own p (a site uses it only when `rate_from_buffer` is set; `rate` is not saved in
checkpoints); the backend's hand-written MLP forward draws each member's noise from the member's
own stream and applies it with `noise_multiplier`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn


class SiteDropout(nn.Module):
    """One dropout site. `base_p` is the configured rate; `p` is the rate in force now, which a
    schedule changes every epoch. `where` says where the site sits, for logs. Its mask (or noise)
    is drawn by `apply_dropout`, with p as a float (`drop`) or as the `rate` tensor (`drop_rate`,
    what stacked members use)."""

    kind = "?"

    def __init__(self, p: float, where: str):
        super().__init__()
        # p as a tensor, kept equal to `p` (its setter fills it): the per-member p of stacked members.
        # Not persistent, so a model's state_dict (and every checkpoint) is what it was without it.
        self.register_buffer("rate", torch.tensor(float(p)), persistent=False)
        self.base_p = float(p)
        self.p = float(p)
        self.where = where
        self.one_draw_per_batch = False
        self.rate_from_buffer = False  # drop with `rate` (tensor p) instead of `p` (float p)

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = float(value)
        self.rate.fill_(self._p)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """x with this kind's mask (or noise) applied, in training or evaluation mode."""
        return apply_dropout(self.kind, x, self.p, self.training)

    def drop_rate(self, x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        """`drop` with p as a tensor: masks from `torch.rand_like` (vmap batches it, one draw per
        member), no branch on p's value (vmap cannot branch on a tensor). p=0 keeps every unit
        and scales by exactly 1, so a p=0 member computes what a site without dropout does."""
        return apply_dropout(self.kind, x, rate, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = self._drop_with_rate if self.rate_from_buffer else self.drop
        if self.training and self.one_draw_per_batch:
            # Every kind multiplies by noise: draw it once (on ones) for the whole batch, so a pass
            # is one thinned network and MC samples of a function over a grid are whole functions.
            return x * drop(torch.ones_like(x[:1]))
        return drop(x)

    def _drop_with_rate(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_rate(x, self.rate)

    def extra_repr(self) -> str:
        return f"p={self.p:g}, {self.where}"


class InvertedDropout(SiteDropout):
    kind = "inverted"


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """1 where a unit is kept (probability 1-p), 0 where it is dropped: the same Bernoulli draw,
    from the same generator, that torch's CPU dropout makes."""
    return torch.empty_like(x).bernoulli_(1.0 - p)


class VanillaDropout(SiteDropout):
    kind = "vanilla"


class GaussianDropout(SiteDropout):
    kind = "gaussian"


class SpatialDropout(SiteDropout):
    kind = "spatial"


def apply_dropout(kind: str, x: torch.Tensor, p: float | torch.Tensor, training: bool) -> torch.Tensor:
    """x with dropout of `kind` at rate p: the one implementation of every kind, for a single
    site (p a float) and for stacked members (p a tensor broadcastable over x, e.g.
    [M, 1, 1] for activations [M, N, H]: each member its own p).

    A float p draws exactly as the matching torch modules do (F.dropout, F.dropout2d), so a
    single run's masks stay those of nn.Dropout. A tensor p draws uniforms from the global
    generator and keeps a unit where u >= p, with probability 1-p, as torch's
    Bernoulli(1-p) mask does: every member, example and unit draws on its own. The tensor form
    never branches on p's value (vmap cannot), and p=0 keeps every unit with a scale of exactly 1."""
    if kind == "none":
        return x
    tensor_p = torch.is_tensor(p)
    if not training:
        # A unit was present with probability 1-p in training, so its expected contribution is
        # (1-p)·x: vanilla scales here to keep training and evaluation in agreement.
        return x * (1.0 - p) if kind == "vanilla" else x
    if not tensor_p:
        if kind == "inverted":
            # torch's own kernel rather than a hand-written mask: bit-identical to nn.Dropout for
            # the same generator state on every device (CUDA draws its masks in a fused kernel).
            # On the CPU it is exactly `x * keep_mask(x, p) / (1 - p)`, the vanilla draw rescaled.
            return F.dropout(x, p, True)
        if kind == "spatial":
            # One draw per (sample, channel): neighbouring pixels of a feature map are strongly
            # correlated, so dropping single pixels removes little; dropping a whole map does.
            return F.dropout2d(x, p, True)
        if p == 0.0:
            return x  # draw nothing, so p=0 consumes no random numbers, as torch's dropout
        if kind == "vanilla":
            return x * keep_mask(x, p)
        # σ² = p/(1-p) is the variance of inverted dropout's multiplier m/(1-p), m ~ Bernoulli(1-p).
        return x * (1.0 + math.sqrt(p / (1.0 - p)) * torch.randn_like(x))
    # spatial: one draw per (member, sample, channel) of maps [..., C, H, W].
    like = x[..., :1, :1] if kind == "spatial" else x
    # `*_like` draws from the global generator, which vmap (randomness="different") batches:
    # one independent draw per member there too.
    noise = (torch.randn_like if kind == "gaussian" else torch.rand_like)(like)
    return apply_noise(kind, x, p, noise)


def noise_is_normal(kind: str) -> bool:
    """Whether `apply_noise` takes standard normal draws (gaussian) rather than uniform ones."""
    return kind == "gaussian"


def apply_noise(kind: str, x: torch.Tensor, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Training-mode dropout of `kind` with tensor p from noise drawn beforehand (uniform on [0, 1),
    or standard normal for gaussian, shaped like x or broadcastable to it): a unit is kept where
    u >= p, with probability 1-p, as torch's Bernoulli(1-p) mask keeps it."""
    if kind == "gaussian":
        return x * (1.0 + torch.sqrt(p / (1.0 - p)) * noise)
    keep = noise >= p
    return x * keep if kind == "vanilla" else x * keep / (1.0 - p)


def noise_multiplier(kind: str, noise: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """What `apply_noise` multiplies x by, for many sites at once (p broadcast per unit): a
    stacked step computes it once for all its sites, then multiplies each site's slice."""
    if kind == "gaussian":
        return 1.0 + torch.sqrt(p / (1.0 - p)) * noise
    keep = noise >= p
    return keep.to(noise.dtype) if kind == "vanilla" else keep * (1.0 / (1.0 - p))


FORMULATIONS: dict[str, type[SiteDropout]] = {
    "inverted": InvertedDropout,
    "vanilla": VanillaDropout,
    "gaussian": GaussianDropout,
    "spatial": SpatialDropout,
}


def make_dropout(kind: str, p: float, where: str, feature_maps: bool = False) -> SiteDropout | None:
    """The site for `model.dropout_kind=kind`, or None when the kind is `none`. `feature_maps`
    says the site sees [N, C, H, W] maps; elsewhere `spatial` drops single units (inverted)."""
    if kind == "none":
        return None
    if kind == "spatial" and not feature_maps:
        return InvertedDropout(p, where)
    return FORMULATIONS[kind](p, where)


def site_rates(dropout: Any, n_sites: int) -> list[float]:
    """A configured rate as one p per site: a single p is used at every site."""
    if isinstance(dropout, (list, tuple, ListConfig)):
        if len(dropout) != n_sites:
            raise ValueError(f"{len(dropout)} dropout values for {n_sites} dropout sites")
        return [float(p) for p in dropout]
    return [float(dropout)] * n_sites


def sites(model: nn.Module) -> list[tuple[str, SiteDropout]]:
    """(module name, site) for every dropout site, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SiteDropout)]


def describe_sites(model: nn.Module) -> list[str]:
    """'<module name> (<where>): <kind> p=<p>' for every dropout site, in forward order."""
    return [f"{name} ({m.where}): {m.kind} p={m.base_p:g}" for name, m in sites(model)]


def arm_label(dropout: Any, kind: str = "inverted") -> str:
    """A short name for a dropout setting, used for job types and arm directories:
    dropout-0.5 for the default (inverted) kind, vanilla-dropout-0.5 etc. for the others."""
    if kind == "none":
        return "no-dropout"
    if isinstance(dropout, (list, tuple, ListConfig)):
        rates = "-".join(f"{float(p):g}" for p in dropout)
    else:
        rates = f"{float(dropout):g}"
    return f"dropout-{rates}" if kind == "inverted" else f"{kind}-dropout-{rates}"


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class DropoutSchedule:
    """p over epochs (`model.dropout_schedule`). Epochs count from 1; over the ramp the fraction
    t = (epoch - 1) / epochs runs from 0 to 1, so `warmup` trains epoch 1 at 0 and reaches p at
    epoch epochs+1, `anneal` trains epoch 1 at p and reaches 0 at epoch epochs+1; both then stay."""

    kind: str = "constant"
    epochs: int = 1

    def rate(self, base_p: float, epoch: int) -> float:
        if self.kind == "constant":
            return base_p
        t = min(1.0, (epoch - 1) / self.epochs)
        return base_p * t if self.kind == "warmup" else base_p * (1.0 - t)

    def apply(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Set every site's p for `epoch`; return them as metrics `dropout/p/<site>`."""
        return self.apply_to(sites(model), epoch)

    def apply_to(self, named_sites: list[tuple[str, SiteDropout]], epoch: int) -> dict[str, float]:
        """`apply` on a model's `sites`, looked up once."""
        rates = {}
        for name, site in named_sites:
            site.p = self.rate(site.base_p, epoch)
            rates[f"dropout/p/{name}"] = site.p
        return rates

    def describe(self) -> str:
        if self.kind == "constant":
            return "constant p"
        return f"{self.kind}: " + ("0 -> p" if self.kind == "warmup" else "p -> 0") + f" over {self.epochs} epochs"


# --------------------------------------------------------------------------- MC dropout


@contextmanager
def mc_dropout(model: nn.Module, one_draw_per_batch: bool = False) -> Iterator[nn.Module]:
    """Evaluation mode everywhere except the dropout sites, which keep drawing (Gal &
    Ghahramani 2016): one draw per example, or with `one_draw_per_batch` one per forward pass.
    The previous modes, and the random generators' states, are restored afterwards."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for _, site in sites(model):
        site.train()
        site.one_draw_per_batch = one_draw_per_batch
    # The passes draw from a fork of the global generator (CPU, and the model's CUDA device), so
    # evaluating with MC dropout leaves training's random stream as it was: a run with
    # eval.mc_samples trains exactly like the same run without it.
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield model
    finally:
        for _, site in sites(model):
            site.one_draw_per_batch = False
        model.train(was_training)


def drops_anything(model: nn.Module) -> bool:
    """Whether some site is stochastic now (a p=0 site, or a model without sites, is deterministic)."""
    return any(site.p > 0 for _, site in sites(model))
