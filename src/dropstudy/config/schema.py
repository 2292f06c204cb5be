"""The config schema: every key, its type and default, and each choice list (a StrEnum) declared once."""

from __future__ import annotations

import secrets
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


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
    # nets (faster for the CIFAR-10 CNN on a CPU, BENCHMARKS.md, and what tensor cores want).
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
    # process when the members allow it (engine/batching.py); false = one job per member.
    vectorize: bool = True
    # The most members trained as one batch; a larger grid trains in batches of this many, one
    # batch after another. Memory grows linearly with it (see README, "Sweeps").
    max_members: int = 16
    # How a batch's members (and a single run, a batch of one) run on one device: stacked (one
    # forward/backward for all), sequential (in turn, each exactly its single run) or auto
    # (stacked for the MLP, and for the CNN on CUDA with several members; else sequential).
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


# A short random id drawn once per process: it ends the default run and sweep directory names
# (conf/config.yaml), so two commands started in the same second get different directories,
# while every read of the name within one process gives the same one.
_PROCESS_UID = secrets.token_hex(2)


def process_uid() -> str:
    return _PROCESS_UID


register_schema()
OmegaConf.register_new_resolver("dropstudy_uid", process_uid, replace=True)
