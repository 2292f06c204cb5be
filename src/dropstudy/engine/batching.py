"""Which members may train together as one batch, and how (`member_execution`): rules on their
configs alone, without torch, so that planning a sweep stays light."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from dropstudy.store.text import flatten

if TYPE_CHECKING:
    import torch

EXECUTIONS = ("stacked", "sequential")
# What members may differ in; everything else must be the same for all. tracker.* only says where
# a run is logged; data.seed picks each member's rows of the one shared copy of the data.
VARYING_KEYS = (
    "seed",
    "data.seed",
    "model.dropout",
    "model.input_dropout",
    "model.conv_dropout",
    "model.dropout_schedule.kind",
    "model.dropout_schedule.epochs",
)
VARYING_PREFIXES = ("tracker.",)


def _site_layout(model: DictConfig) -> tuple[bool, bool]:
    """Which optional dropout sites a model has (input site, conv sites): members must agree, since
    their parameters and rates are stacked site by site."""
    if model.dropout_kind == "none":
        return False, False
    conv = model.get("conv_dropout", 0.0)
    conv_values = list(conv) if OmegaConf.is_list(conv) or isinstance(conv, (list, tuple)) else [conv]
    return float(model.input_dropout) > 0, model.name == "cnn" and any(float(p) > 0 for p in conv_values)


def why_not(cfgs: list[DictConfig]) -> str | None:
    """None when these configs can train as one batch of members; else a short reason naming the key."""
    if not cfgs:
        return "there are no members to train"
    layout = _site_layout(cfgs[0].model)
    for cfg in cfgs[1:]:
        if _site_layout(cfg.model) != layout:
            return ("members have different dropout sites (model.input_dropout or model.conv_dropout is 0 for some "
                    "and not for others); a batch stacks its members site by site")
    difference = config_difference(cfgs, VARYING_KEYS, VARYING_PREFIXES)
    if difference is not None:
        return f"members differ in {difference}; only {', '.join(VARYING_KEYS)} may differ"
    return None


def config_difference(cfgs: list[DictConfig], varying: tuple[str, ...], prefixes: tuple[str, ...]) -> str | None:
    """`key (a vs b)` for the first config key, other than `varying` and `prefixes`, in which a
    member differs from the first one; None when they agree on all of them."""
    first = flatten(OmegaConf.to_container(cfgs[0], resolve=True))
    for cfg in cfgs[1:]:
        other = flatten(OmegaConf.to_container(cfg, resolve=True))
        for key in sorted(set(first) | set(other)):
            if key not in varying and not key.startswith(prefixes) and first.get(key) != other.get(key):
                return f"{key} ({first.get(key)!r} vs {other.get(key)!r})"
    return None


def member_execution(requested: str, cfgs: list[DictConfig], device: torch.device) -> str:
    """`sweep.member_execution` resolved for these members on this device: stacked or sequential."""
    cfg = cfgs[0]
    # A skipped step must leave one member's optimizer alone (Adam's step count is per tensor, one
    # for all stacked members), and torch.compile wraps a module, not the stacked step.
    needs_sequential = {"trainer.on_nan=skip": cfg.trainer.on_nan == "skip", "trainer.compile=true": cfg.trainer.compile}
    if requested == "auto":
        if any(needs_sequential.values()):
            return "sequential"
        if cfg.model.name == "mlp":
            return "stacked"
        return "stacked" if device.type == "cuda" and len(cfgs) > 1 else "sequential"
    if requested == "stacked":
        for key, needs in needs_sequential.items():
            if needs:
                raise ValueError(f"sweep.member_execution=stacked cannot train with {key}; use sequential or auto")
    if requested not in EXECUTIONS:
        raise ValueError(f"sweep.member_execution={requested!r}: use auto, {' or '.join(EXECUTIONS)}")
    return requested
