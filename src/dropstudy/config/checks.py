"""Checks of a composed config: every bad value is a ConfigError naming the key and what is allowed."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from dropstudy.config.schema import CHOICE_KEYS, DropoutKind, TrackerConfig


class ConfigError(Exception):
    """Bad user input: the message names the key and what is allowed."""


def choice_text(key: str, value: Any, allowed: Iterable[str]) -> str:
    """The one message for a value outside a key's choices, e.g. "trainer.amp='fp16': use one of auto, bf16, off."."""
    return f"{key}={value!r}: use one of {', '.join(str(a) for a in allowed)}."


def check_choices(cfg: DictConfig) -> None:
    """Each choice key holds one of its choices. Hydra checks these at composition; a saved config
    (resume, rerun) is plain YAML without the schema's types, so it is checked here."""
    for key, allowed in CHOICE_KEYS.items():
        value = OmegaConf.select(cfg, key)
        if value not in tuple(allowed):
            raise ConfigError(choice_text(key, value, allowed))


# trainer.* counts: each must be at least 1 (null, where the schema allows it, has the meaning given).
TRAINER_COUNTS = {
    "epochs": "must be a positive integer.",
    "eval_every": "must be a positive integer.",
    "log_every": "a positive number of epochs (1 = a metrics row every epoch).",
    "batch_size": "must be a positive integer, or null for full batch.",
    "checkpoint_every": "a positive number of epochs, or null for every evaluation.",
    "threads": "a positive number of CPU threads, or null for one per available core.",
    "eval_batch_size": "must be a positive integer.",
}


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


# `model.dropout` sets the sites after the hidden layers: one after each hidden layer of the MLP,
# the two around the CNN's fc 512->512. The input and conv sites have keys of their own.
DROPOUT_SITES = {"mlp": lambda m: len(m.hidden), "cnn": lambda m: 2}


DROPOUT_SITES_WHERE = {"mlp": "one after each hidden layer", "cnn": "before and after fc1"}


def dropout_site_count(model_cfg: DictConfig) -> int:
    """How many p `model.dropout` takes as a list."""
    return DROPOUT_SITES[model_cfg.name](model_cfg)


def _check_p(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r}: a dropout probability must be a number in [0, 1).")
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(
            f"{key}={value}: the probability of dropping a unit must be in [0, 1) "
            "(0 = no dropout; 1 would drop every unit)."
        )
    return float(value)


def check_dropout(key: str, value: Any, n_sites: int, where: str) -> None:
    """One p for every site, or a list with exactly one p per dropout site."""
    if isinstance(value, (list, tuple, ListConfig)):
        if len(value) != n_sites:
            raise ConfigError(
                f"{key}={list(value)}: it sets {n_sites} dropout sites in this model ({where}), so a "
                f"per-site list needs exactly {n_sites} values (or give one p for all of them)."
            )
        for i, v in enumerate(value):
            _check_p(f"{key}[{i}]", v)
    else:
        _check_p(key, value)


def validate_dropout(model: DictConfig) -> None:
    """model.dropout, dropout_kind, input_dropout, conv_dropout and dropout_schedule (their choices
    are check_choices')."""
    check_dropout("model.dropout", model.dropout, dropout_site_count(model), DROPOUT_SITES_WHERE[model.name])
    _check_p("model.input_dropout", model.input_dropout)
    if model.name == "cnn":
        check_dropout("model.conv_dropout", model.conv_dropout, len(model.channels), "one after each conv block")
    if model.dropout_kind == "spatial":
        if model.name != "cnn":
            raise ConfigError(
                f"model.dropout_kind=spatial drops whole feature maps, and the {model.name} model has none; "
                "use it with experiment=cifar10, or pick another kind: "
                f"{', '.join(k for k in DropoutKind if k != DropoutKind.spatial)}."
            )
        if not _any_positive(model.conv_dropout):
            raise ConfigError(
                f"model.dropout_kind=spatial drops whole feature maps after the conv blocks, but "
                f"model.conv_dropout={model.conv_dropout} creates no conv dropout sites; set it, "
                "e.g. model.conv_dropout=0.1."
            )
    schedule = model.dropout_schedule
    if schedule.epochs is not None and schedule.epochs < 1:
        raise ConfigError(
            f"model.dropout_schedule.epochs={schedule.epochs}: a positive number of epochs, or null for "
            "the whole run."
        )


def _any_positive(dropout: Any) -> bool:
    values = dropout if isinstance(dropout, (list, tuple, ListConfig)) else [dropout]
    return any(float(p) > 0 for p in values)


def validate_study(cfg: DictConfig) -> None:
    """What only `study` needs: arms that train different networks."""
    if cfg.model.dropout_kind == "none" and len(cfg.study.arms) > 1:
        raise ConfigError(
            f"model.dropout_kind=none: every arm of study.arms={list(cfg.study.arms)} would train the same "
            "network without dropout; pick a kind that drops units "
            f"({', '.join(k for k in DropoutKind if k != DropoutKind.none)}), or use `dropstudy train model.dropout_kind=none`."
        )


OBJECTIVE_SPLITS = ("train", "val", "test", "val_mc", "test_mc", "gap")


# What the last part of a metric's name says about which way is better.
OBJECTIVE_DIRECTIONS = {"loss": "minimize", "mse": "minimize", "ece": "minimize", "acc": "maximize"}


def objective_direction(metric: str) -> str:
    """`minimize` or `maximize` for a metric name such as val/loss or val/acc."""
    return OBJECTIVE_DIRECTIONS[metric.rpartition("/")[2]]


def check_objective(cfg: DictConfig) -> None:
    """sweep.objective names a metric this run logs, one whose better direction is known."""
    metric = str(cfg.sweep.objective)
    split, _, name = metric.partition("/")
    examples = "val/loss (the default), val/acc, test/loss, val_mc/loss, test_mc/ece"
    if split not in OBJECTIVE_SPLITS or name not in OBJECTIVE_DIRECTIONS:
        raise ConfigError(
            f"sweep.objective={metric!r}: name a metric as <split>/<name>, split one of "
            f"{', '.join(OBJECTIVE_SPLITS)} and name one of {', '.join(OBJECTIVE_DIRECTIONS)} (loss, mse and ece "
            f"are minimized, acc maximized), e.g. {examples}.")
    if name in ("acc", "ece") and cfg.data.name != "cifar10":
        raise ConfigError(f"sweep.objective={metric}: the {cfg.experiment} experiment logs no {name}; "
                          "use a loss, e.g. val/loss.")
    if split.endswith("_mc") and not cfg.eval.mc_samples:
        raise ConfigError(f"sweep.objective={metric}: MC-dropout metrics need eval.mc_samples (e.g. 20).")
    if name == "ece" and not split.endswith("_mc") and split != "test":
        raise ConfigError(f"sweep.objective={metric}: the ECE is logged as test/ece and val_mc/ece, test_mc/ece.")


# The float keys, each with what a value of it means: nan or inf is none of these.
FINITE_FLOATS = {
    "optim.lr": "a positive learning rate, e.g. 0.01",
    "optim.momentum": "SGD momentum, 0 (off) or positive, e.g. 0.9",
    "optim.weight_decay": "an L2 penalty, 0 (off) or positive, e.g. 5e-4",
    "optim.max_norm": "a positive norm (typically 3 or 4), or null for no constraint",
    "data.slope": "the slope of the regression line, e.g. 1.5",
    "data.train_noise": "a noise standard deviation, 0 or positive",
    "data.test_noise": "a noise standard deviation, 0 or positive",
}


def check_finite_floats(cfg: DictConfig) -> None:
    """nan and inf parse as floats, and pass a range check written as `value <= 0`; none of
    these keys has a meaning for them, so each is refused by name."""
    for key, meaning in FINITE_FLOATS.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: must be a finite number ({meaning}).")


def validate(cfg: DictConfig) -> None:
    """Range and consistency checks that the schema's types cannot express."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # `???`, given on the command line or left by an experiment that does not set the key
        raise ConfigError(f"{missing[0]}=???: it needs a value; set it with {missing[0]}=VALUE.")
    check_choices(cfg)
    if not DEVICE_PATTERN.match(str(cfg.device)):
        raise ConfigError(f"device={cfg.device!r}: use auto, cpu, cuda, cuda:N or mps.")
    validate_dropout(cfg.model)
    n_sites, where = dropout_site_count(cfg.model), DROPOUT_SITES_WHERE[cfg.model.name]
    for i, arm in enumerate(cfg.study.arms):
        check_dropout(f"study.arms[{i}]", arm, n_sites, where)
    if len(cfg.study.arms) == 0:
        raise ConfigError("study.arms=[]: list at least one dropout value, e.g. study.arms=[0.0,0.5].")
    check_finite_floats(cfg)
    if cfg.optim.max_norm is not None and cfg.optim.max_norm <= 0:
        raise ConfigError(
            f"optim.max_norm={cfg.optim.max_norm}: the largest L2 norm of a unit's incoming weights "
            "must be positive (typically 3 or 4), or null for no constraint."
        )
    if cfg.eval.mc_samples < 0 or cfg.eval.mc_samples == 1:
        raise ConfigError(
            f"eval.mc_samples={cfg.eval.mc_samples}: 0 turns MC-dropout evaluation off; otherwise the "
            "number of stochastic passes to average must be at least 2 (typically 20 to 100)."
        )
    for key, rule in TRAINER_COUNTS.items():
        value = cfg.trainer[key]
        if value is not None and value < 1:
            raise ConfigError(f"trainer.{key}={value}: {rule}")
    check_objective(cfg)
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr}: must be positive.")
    for key in ("momentum", "weight_decay"):
        if cfg.optim[key] < 0:
            raise ConfigError(f"optim.{key}={cfg.optim[key]}: must be 0 (off) or positive.")
    if cfg.tracker.log_freq is not None and cfg.tracker.log_freq < 1:
        raise ConfigError(
            f"tracker.log_freq={cfg.tracker.log_freq}: a positive number of steps, or null for once per evaluation."
        )
    init_timeout = cfg.tracker.get("init_timeout", TrackerConfig.init_timeout)
    if not isinstance(init_timeout, (int, float)) or not math.isfinite(init_timeout) or init_timeout <= 0:
        raise ConfigError(
            f"tracker.init_timeout={init_timeout}: seconds to wait for the W&B server, a positive number "
            f"(default {TrackerConfig.init_timeout:g})."
        )
    if cfg.sweep.max_members < 1:
        raise ConfigError(f"sweep.max_members={cfg.sweep.max_members}: the most members trained as one batched "
                          "model must be at least 1.")
    data = cfg.data
    if data.name == "regression":
        if data.n_points < 2:
            raise ConfigError(f"data.n_points={data.n_points}: need at least 2 points.")
        for key in ("train_noise", "test_noise"):
            if data[key] < 0:
                raise ConfigError(f"data.{key}={data[key]}: a noise standard deviation cannot be negative.")
    else:
        if data.subset is not None and data.subset < 2:
            raise ConfigError(f"data.subset={data.subset}: null for the whole set, or at least 2 images.")
        if data.val_size < 1:
            raise ConfigError(f"data.val_size={data.val_size}: must be a positive number of images.")
