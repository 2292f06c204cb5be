"""The config schema, where `conf/` lives, and the checks that turn bad input into one clear message.

Every key a user can set is declared here once, as dataclasses registered in Hydra's
ConfigStore; the YAML files under `conf/` only fill in values. A key that is not declared, or a
value of the wrong type, therefore fails when Hydra composes the config. `validate` adds the
checks a type cannot express (ranges, list lengths, devices), and `compose`, the one function that
composes a config from overrides (for the CLI, the tests and the scripts), runs both and raises
`ConfigError` with a message that names the key and what is allowed.
"""

from __future__ import annotations

import math
import re
import secrets
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Iterable, List, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException


# --------------------------------------------------------------------------- schema


def choice(name: str, values: str) -> type[StrEnum]:
    """A choice key's type: Hydra refuses any other value at composition (a typo is one message
    naming the key and the choices, exit 2), and each member equals its own string, so code and
    saved configs compare it with plain strings."""
    return StrEnum(name, values.split(), module=__name__)


# The choices of the string keys below, declared once: every check and message that lists a key's
# choices reads them from here (CHOICE_KEYS, choice_text). dropout.py implements one module per kind,
# and conf/ has one file per experiment, model, data set and optimizer (kept here so that `--help`
# and config checks need no torch).
Experiment = choice("Experiment", "regression cifar10")
ModelName = choice("ModelName", "mlp cnn")
DataName = choice("DataName", "regression cifar10")
DropoutKind = choice("DropoutKind", "inverted vanilla gaussian spatial none")
ScheduleKind = choice("ScheduleKind", "constant warmup anneal")
OptimName = choice("OptimName", "sgd adam")
OnNan = choice("OnNan", "stop skip raise")
Amp = choice("Amp", "auto bf16 off")
TrackerMode = choice("TrackerMode", "auto online offline disabled")
Watch = choice("Watch", "gradients parameters all none")
MemberExecution = choice("MemberExecution", "auto stacked sequential")


@dataclass
class DropoutScheduleConfig:
    # constant: p throughout; warmup: 0 -> p over `epochs`; anneal: p -> 0 over `epochs`.
    kind: ScheduleKind = ScheduleKind.constant
    # Length of the ramp in epochs; null = the whole run (trainer.epochs).
    epochs: Optional[int] = None


@dataclass
class ModelConfig:
    """What every model has: its dropout sites and how they drop."""

    name: ModelName = MISSING
    # p of dropping a unit (PyTorch's convention), or one p per hidden-layer dropout site.
    dropout: Any = 0.0
    dropout_kind: DropoutKind = DropoutKind.inverted
    # p on the inputs; 0 = no input dropout site at all.
    input_dropout: float = 0.0
    dropout_schedule: DropoutScheduleConfig = field(default_factory=DropoutScheduleConfig)


@dataclass
class MLPConfig(ModelConfig):
    # 1 -> 200 -> 200 -> 200 -> 1, ReLU then dropout after each hidden layer, none before the output.
    name: ModelName = ModelName.mlp
    in_features: int = 1
    hidden: List[int] = field(default_factory=lambda: [200, 200, 200])
    out_features: int = 1


@dataclass
class CNNConfig(ModelConfig):
    # conv 3->32->64->128 (3x3, no padding), each ReLU + 2x2 max-pool; flatten (512), dropout,
    # fc 512->512, ReLU, dropout, fc 512->10.
    name: ModelName = ModelName.cnn
    channels: List[int] = field(default_factory=lambda: [32, 64, 128])
    hidden: int = 512
    num_classes: int = 10
    # p after each conv block (one p, or one per block); 0 = no conv dropout sites.
    conv_dropout: Any = 0.0


@dataclass
class RegressionDataConfig:
    # x evenly spaced on [-1, 1]; y = slope*x + N(0, train_noise^2) for training, and the same x
    # with N(0, test_noise^2) for the held-out sets. The validation set is an independent draw
    # like the test set, so `val/*` exists for every experiment; training never sees either.
    name: DataName = DataName.regression
    n_points: int = 10
    slope: float = 1.5
    train_noise: float = 0.5
    test_noise: float = 0.3
    # Seeds data generation (and, for CIFAR-10, the validation split) apart from the model.
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class Cifar10DataConfig:
    name: DataName = DataName.cifar10
    root: str = "${oc.env:DROPSTUDY_DATA,'~/.cache/dropstudy'}"
    download: bool = False
    subset: Optional[int] = None
    synthetic: bool = False
    val_size: int = 5000
    # torchvision's MD5 check of the batch files; false only for hand-made copies.
    verify: bool = True
    # Also hash every source file's bytes into the decoded-tensor cache's key (slower to check; for
    # copies that keep file sizes and mtimes). Off: paths, sizes and mtimes decide.
    cache_hash: bool = False
    # Random crop (zero padding 4) and horizontal flip of each training batch, on the device. Off by
    # default: the tutorial this study follows trains without augmentation.
    augment: bool = False
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sgd
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    # Max-norm constraint (Srivastava et al. 2014): after every step each unit's incoming weight
    # vector is rescaled to an L2 norm <= max_norm; null = off.
    max_norm: Optional[float] = None


@dataclass
class TrainerConfig:
    epochs: int = 1
    # Evaluate every N epochs (and at the last): validation and the training data in eval mode, a
    # metrics row each, and the epochs best/* can name. Histograms have their own cadence, tracker.log_freq.
    eval_every: int = 1
    # Log a metrics row (metrics.jsonl and W&B) every N epochs; evaluation epochs, the last epoch
    # and a diverging epoch are always logged. Each row costs W&B about half a millisecond, so a
    # 2000-epoch regression run logs every 10th epoch (200 points per curve).
    log_every: int = 1
    # null: the whole training set in one batch (the regression study).
    batch_size: Optional[int] = None
    # Evaluation runs without autograd, so it can use far larger batches than training.
    eval_batch_size: int = 1000
    # Write checkpoints/last.pt every N epochs (and at the end); null = every evaluation.
    checkpoint_every: Optional[int] = None
    # A NaN/inf loss: stop (status diverged), skip that step, or raise an error.
    on_nan: OnNan = OnNan.stop
    # Speed switches (runtime.FastPaths applies them). channels_last: NHWC memory format for conv
    # nets (1.2x faster for the CIFAR-10 CNN on a 2-core x86 CPU, and what tensor cores want).
    channels_last: bool = True
    # bf16 autocast: auto = on for CUDA devices that support bf16, off elsewhere; bf16 forces it
    # (CPU too, slower there on most CPUs); off = float32 throughout.
    amp: Amp = Amp.auto
    # torch.compile the model (a one-off compile of tens of seconds; pays off for long runs).
    compile: bool = False
    # CPU threads for torch; null = the CPUs this process may use, at most one per physical core.
    threads: Optional[int] = None


@dataclass
class TrackerConfig:
    mode: TrackerMode = TrackerMode.auto
    project: str = "dropstudy"
    entity: Optional[str] = None
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    watch: Watch = Watch.all
    # The weight/gradient histogram cadence (tracker.watch), in optimizer steps as wandb.watch counts
    # them; null = once per evaluation (trainer.eval_every epochs). The one key for histograms.
    log_freq: Optional[int] = None
    # Seconds to wait for the W&B server when online; then the run logs to offline W&B instead.
    init_timeout: float = 30.0


@dataclass
class EvalConfig:
    # MC dropout: also evaluate the mean of this many stochastic passes (dropout on); 0 = off.
    mc_samples: int = 0


@dataclass
class StudyConfig:
    """Each experiment sets its own arms (`conf/experiment/NAME.yaml`): they differ between experiments."""

    arms: List[Any] = MISSING


@dataclass
class SweepConfig:
    # `dropstudy sweep` trains a grid of regression members as one batched model in one
    # process when the members allow it (dropstudy.vectorized); false = one job per member.
    vectorize: bool = True
    # The most members trained as one batched model; a larger grid trains in chunks of this many,
    # one chunk after another. Memory grows linearly with it (see README, "Sweeps").
    max_members: int = 16
    # How the members of an ensemble (dropstudy.ensemble) run on one device: stacked (one vmap'd
    # forward/backward for all), sequential (in turn, one process, one copy of the data) or auto
    # (stacked on CUDA and for the MLP; sequential for the CNN on a CPU).
    member_execution: MemberExecution = MemberExecution.auto
    # What an Optuna search (hydra/sweeper=optuna) optimises: a metric's best value over the
    # run's evaluations (its final value when none is kept), minimized for losses, MSE and ECE,
    # maximized for accuracies (objective_direction).
    objective: str = "val/loss"


@dataclass
class Config:
    experiment: Experiment = MISSING
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"
    model: Any = MISSING
    data: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def register_schema() -> None:
    cs = ConfigStore.instance()
    cs.store(name="dropstudy_schema", node=Config)
    cs.store(group="model", name="mlp_schema", node=MLPConfig)
    cs.store(group="model", name="cnn_schema", node=CNNConfig)
    cs.store(group="data", name="regression_data_schema", node=RegressionDataConfig)
    cs.store(group="data", name="cifar10_data_schema", node=Cifar10DataConfig)


register_schema()


# A short random id drawn once per process: it ends the default run and sweep directory names
# (conf/config.yaml), so two commands started in the same second get different directories,
# while every read of the name within one process gives the same one.
_PROCESS_UID = secrets.token_hex(2)


def process_uid() -> str:
    return _PROCESS_UID


OmegaConf.register_new_resolver("dropstudy_uid", process_uid, replace=True)


# --------------------------------------------------------------------------- conf/ location


def conf_dir() -> Path:
    """`conf/` inside the installed package (wheel), else the checkout's top-level `conf/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dropstudy's conf/ directory was not found next to {here}")


# --------------------------------------------------------------------------- checks


class ConfigError(Exception):
    """Bad user input: the message names the key and what is allowed."""


def choice_text(key: str, value: Any, allowed: Iterable[str]) -> str:
    """The one message for a value outside a key's choices, e.g. "trainer.amp='fp16': use one of auto, bf16, off."."""
    return f"{key}={value!r}: use one of {', '.join(str(a) for a in allowed)}."


def choice_keys(schema: type, prefix: str = "") -> dict[str, type[StrEnum]]:
    """Every choice key of the dataclass `schema` (dotted, nested dataclasses included) with its StrEnum."""
    found: dict[str, type[StrEnum]] = {}
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        hint = hints[f.name]
        if isinstance(hint, type) and issubclass(hint, StrEnum):
            found[prefix + f.name] = hint
        elif is_dataclass(hint):
            found.update(choice_keys(hint, f"{prefix}{f.name}."))
    return found


# Every choice key with its choices, read from the schema. model and data are typed Any at the top
# (the experiment picks their dataclass), so their keys come from the dataclasses the groups use.
CHOICE_KEYS = {
    **choice_keys(Config),
    **{k: v for schema in (MLPConfig, CNNConfig) for k, v in choice_keys(schema, "model.").items()},
    **{k: v for schema in (RegressionDataConfig, Cifar10DataConfig) for k, v in choice_keys(schema, "data.").items()},
}
# The config groups whose options (conf/GROUP/NAME.yaml) are a choice key's choices.
GROUP_KEYS = {"experiment": "experiment", "model": "model.name", "data": "data.name", "optim": "optim.name"}


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


# --------------------------------------------------------------------------- composition


def _omegaconf_cause(exc: BaseException) -> OmegaConfBaseException | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _valid_keys(full_key: str) -> str:
    """The keys allowed beside `full_key`, read from the default config."""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    try:
        base = compose([], resolve=False)
        node = OmegaConf.select(base, parent) if parent else base
        keys = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        keys = []
    where = f"under {parent}" if parent else "at the top level"
    return f"valid keys {where}: {', '.join(keys)}" if keys else ""


# OmegaConf's message for a value outside an Enum-typed key's choices.
INVALID_CHOICE = re.compile(r"Invalid value '(.*)', expected one of \[.*\]")


def explain_composition_error(exc: BaseException) -> str:
    """Turn Hydra/OmegaConf's composition errors into one paragraph naming the key."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, value = exc.missing_cfg_file.partition("/")
        if group in GROUP_KEYS:
            return choice_text(group, value, CHOICE_KEYS[GROUP_KEYS[group]])
    cause = _omegaconf_cause(exc)
    if cause is not None and getattr(cause, "full_key", None):
        key = cause.full_key
        text = str(cause).splitlines()[0]
        if "not in" in text or "Key '" in text and "not" in text:
            hint = _valid_keys(key)
            return f"{key}: unknown key. {hint}. (To add a new key on purpose use +{key}=VALUE.)"
        invalid = INVALID_CHOICE.match(text)
        if invalid and key in CHOICE_KEYS:  # a choice key (an Enum in the schema) given another value
            return choice_text(key, invalid.group(1), CHOICE_KEYS[key])
        return f"{key}: {text}"
    first = str(exc).strip().splitlines()
    return " ".join(line.strip() for line in first if line.strip())


def compose(overrides: list[str], command: str = "train", *, resolve: bool = True,
            return_hydra_config: bool = False) -> DictConfig:
    """The config `overrides` compose, checked (ConfigError on any bad input): what every command
    runs, and what tests and scripts build runs from. `resolve=False` keeps interpolations as
    written (`${seed}`). `return_hydra_config` also keeps Hydra's own node, with `hydra.run.dir`, the
    directory a run of `command` writes, resolved once: its `${now:}` is read again, and may differ,
    each time it is read."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    setup_globals()  # Hydra's `now` resolver
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[*overrides, f"hydra.job.name={command}"],
                                return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the directory's name
        with open_dict(cfg), read_write(cfg.hydra):
            cfg.hydra.run.dir = str(cfg.hydra.run.dir)
            hydra_node = cfg.pop("hydra")
        if resolve:
            OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(explain_composition_error(exc)) from exc
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    validate(cfg)
    if return_hydra_config:
        with open_dict(cfg):
            cfg.hydra = hydra_node
    return cfg


HYDRA_PLAIN_VALUE = re.compile(r"^[\w./:-]+$")


def hydra_value(text: str) -> str:
    """`text` as a Hydra override value that reads back as exactly `text` (a path, say): quoted
    when it holds anything beyond word characters, `.`, `/`, `:` and `-`."""
    if HYDRA_PLAIN_VALUE.match(text):
        return text
    # In Hydra's quoted strings a backslash escapes a quote, so the backslashes right before a
    # quote, or at the end, are doubled.
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"
