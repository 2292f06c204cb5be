"""Planning a sweep: the grid's jobs, composed and checked before anything is launched, with their run directories."""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dropstudy.config.checks import ConfigError, validate
from dropstudy.config.compose import explain_composition_error, hydra_value
from dropstudy.config.hydra_internals import apply_overrides, hydra_instance, is_hydra_override, split_sweep_arguments
from dropstudy.engine.batching import why_not
from dropstudy.store.rundir import RunDirClaimError, refuse_used



# hydra/launcher=NAME -> the plugin module it needs (`slurm` is conf/hydra/launcher/slurm.yaml).
LAUNCHER_PLUGINS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",
}


LAUNCHERS = ("basic", *LAUNCHER_PLUGINS)


# hydra/sweeper=NAME -> its plugin module; `basic` (Hydra's grid) is the default.
SWEEPER_PLUGINS = {"optuna": "hydra_plugins.hydra_optuna_sweeper"}


@dataclass
class SearchSpec:
    """What an Optuna search (sweeps.search) searches, and for what."""

    sweeper: str
    objective: str  # sweep.objective, e.g. val/loss
    direction: str  # minimize | maximize, from the objective's name
    n_trials: int
    space: dict[str, str]  # key -> the search override's value as given, e.g. interval(0,0.8)


@dataclass
class PlannedJob:
    num: int
    overrides: list[str]  # the job's own task overrides, as .hydra/overrides.yaml will hold them
    cfg: DictConfig  # composed, resolved and validated
    run_dir: Path

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


@dataclass
class SweepPlan:
    sweep_dir: Path
    launcher: str
    group: str
    argv: list[str]  # the overrides handed to Hydra's multirun (sweep dir made explicit)
    jobs: list[PlannedJob]
    master: DictConfig = field(repr=False)  # the multirun config (with hydra), for multirun.yaml
    # An Optuna search (hydra/sweeper=optuna): `jobs` are then the points its config checks
    # composed, and the trials are read back from the run dirs Hydra numbers as it goes.
    search: SearchSpec | None = None

    @property
    def varying(self) -> list[str]:
        """Keys whose value differs between jobs: what the table shows of each job."""
        keys: dict[str, set[str]] = {}
        for job in self.jobs:
            for ov in job.overrides:
                key, _, value = ov.partition("=")
                keys.setdefault(key, set()).add(value)
        return [k for k, values in keys.items() if len(values) > 1 or len(self.jobs) == 1]


def setting(overrides: list[str], varying: set[str] | list[str]) -> str:
    """A job's overrides of the `varying` keys: how the table and messages name the job."""
    return " ".join(o for o in overrides if o.partition("=")[0] in varying)


def hydra_choice(group: str, overrides: list[str]) -> str:
    """The option picked for Hydra's config group `group` (hydra/launcher, hydra/sweeper): the
    last override of it wins, as in Hydra; basic when none."""
    choice = "basic"
    for arg in overrides:
        if arg.startswith(group + "="):
            choice = arg.split("=", 1)[1]
    return choice


def check_launcher(name: str) -> None:
    """The plugin a launcher needs is installed, or a message saying how to get it."""
    if name not in LAUNCHERS:
        raise ConfigError(f"hydra/launcher={name}: no such launcher; choose one of: {', '.join(LAUNCHERS)}.")
    module = LAUNCHER_PLUGINS.get(name)
    if module and importlib.util.find_spec(module) is None:
        package = "hydra-joblib-launcher" if "joblib" in module else "hydra-submitit-launcher"
        raise ConfigError(
            f"hydra/launcher={name} needs the {package} plugin, which is not installed; install the "
            "launchers with: pip install 'dropstudy[cluster]'"
        )


def check_sweeper(name: str) -> None:
    if name != "basic" and name not in SWEEPER_PLUGINS:
        raise ConfigError(f"hydra/sweeper={name}: no such sweeper; choose basic (a grid) or "
                          f"{', '.join(SWEEPER_PLUGINS)}.")
    module = SWEEPER_PLUGINS.get(name)
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(f"hydra/sweeper={name} needs the hydra-optuna-sweeper plugin, which is not installed; "
                          "install it with: pip install 'dropstudy[cluster]'")


def sweep_dir_override(sweep_dir: str) -> str:
    """hydra.sweep.dir=DIR as Hydra's override parser reads it back (quoted unless plain)."""
    return f"hydra.sweep.dir={hydra_value(sweep_dir)}"


def plan_grid(overrides: list[str], new: bool = True) -> SweepPlan:
    """Every job of the grid (Hydra's basic sweeper) that `overrides` describe, composed and
    validated, with its run dir."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    launcher = hydra_choice("hydra/launcher", overrides)
    check_launcher(launcher)
    sweeper = hydra_choice("hydra/sweeper", overrides)
    check_sweeper(sweeper)
    if sweeper != "basic":
        raise ConfigError(f"hydra/sweeper={sweeper}: plan it with sweeps.search.plan_sweep")
    setup_globals()
    args = [*overrides, "hydra.job.name=sweep"]
    try:
        hydra = hydra_instance()
        master = hydra.config_loader.load_configuration(config_name="config", overrides=args, run_mode=RunMode.MULTIRUN)
        # Fix the sweep dir once (it holds ${now:...}): the plan and the launched jobs must agree.
        sweep_dir = str(master.hydra.sweep.dir)
        args.append(sweep_dir_override(sweep_dir))
        master = hydra.config_loader.load_configuration(config_name="config", overrides=args, run_mode=RunMode.MULTIRUN)
        parser = OverridesParser.create(config_loader=hydra.config_loader)
        batches = split_sweep_arguments(parser.parse_overrides(args))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        GlobalHydra.instance().clear()
        raise ConfigError(explain_composition_error(exc)) from exc
    if new:  # `dropstudy resume` re-plans a sweep that is there already
        refuse_used_sweep_dir(Path(sweep_dir))

    jobs: list[PlannedJob] = []
    first_job: DictConfig | None = None
    try:
        for num, job_args in enumerate(batches[0]):
            task_args = [a for a in job_args if not is_hydra_override(a)]
            where = f"sweep job {num} ({' '.join(task_args)})"
            try:
                changed = None if first_job is None else value_changes(
                    parser, hydra.config_loader.repository, batches[0][0], job_args)
                if changed is None:
                    # What Hydra's launchers do for job `num`: its config, then its output dir.
                    job_cfg = hydra.config_loader.load_sweep_config(master, list(job_args))
                else:
                    # Only plain values differ from job 0: job 0's config with them set, as
                    # Hydra's composition would set them (its own override code), without
                    # composing the whole config again (0.3 s a grid point).
                    job_cfg = copy.deepcopy(first_job)
                    with open_dict(job_cfg):
                        apply_overrides(hydra.config_loader, changed, job_cfg)
                        job_cfg.hydra.overrides.task = task_args
                if num == 0 and jobs_differ_in_values_only(master, job_cfg):
                    first_job = copy.deepcopy(job_cfg)
                with open_dict(job_cfg):
                    job_cfg.hydra.job.id = num
                    job_cfg.hydra.job.num = num
                HydraConfig.instance().set_config(job_cfg)
                run_dir = Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
                task_overrides = [str(o) for o in job_cfg.hydra.overrides.task]
                cfg = OmegaConf.create(OmegaConf.to_container(job_cfg, resolve=False))
                with open_dict(cfg):
                    del cfg["hydra"]
                OmegaConf.resolve(cfg)
            except (HydraException, OmegaConfBaseException, ValueError) as exc:
                raise ConfigError(f"{where}: {explain_composition_error(exc)}") from exc
            try:
                validate(cfg)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            jobs.append(PlannedJob(num, task_overrides, cfg, run_dir))
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()

    first = jobs[0].cfg
    group = first.tracker.group or f"{first.experiment}-{Path(sweep_dir).name}"
    return SweepPlan(Path(sweep_dir), launcher, group, args, jobs, master)


def refuse_used_sweep_dir(sweep_dir: Path) -> None:
    """A sweep never writes into a directory that already holds a sweep, a study or a run (the
    command checks again once it holds the directory's lock)."""

    try:
        refuse_used(sweep_dir, "pick another hydra.sweep.dir, or leave it out for a new directory")
    except RunDirClaimError as exc:
        raise ConfigError(str(exc)) from None


def jobs_differ_in_values_only(master: DictConfig, first_job: DictConfig) -> bool:
    """Whether a job's config can be job 0's with other values set (see value_changes): the
    sweep's subdir is the job number (nothing else in the job's Hydra config is used) and no
    value of the task config reads the Hydra config."""
    subdir = OmegaConf.to_container(master.hydra.sweep, resolve=False).get("subdir")
    task = OmegaConf.to_container(first_job, resolve=False)
    task.pop("hydra", None)
    return subdir == "${hydra.job.num}" and "${hydra" not in json.dumps(task)


def value_changes(parser: Any, repository: Any, first_args: list[str], job_args: list[str]) -> list[Any] | None:
    """The overrides in which `job_args` differ from job 0's, parsed, when each one sets a plain
    value that job 0 also set (not a config group, no +/~ edit, not hydra.*); else None, and
    the job is composed from scratch, as Hydra's launchers do."""
    from hydra.core.override_parser.types import OverrideType

    if len(job_args) != len(first_args):
        return None
    pairs = [(arg, first) for arg, first in zip(job_args, first_args) if arg != first]
    ours = parser.parse_overrides([arg for arg, _ in pairs])
    theirs = parser.parse_overrides([first for _, first in pairs])
    for override, first in zip(ours, theirs):
        key = override.key_or_group
        if (key != first.key_or_group or override.type != OverrideType.CHANGE
                or override.package is not None or override.is_sweep_override() or key.startswith("hydra")
                or repository.group_exists(key)):
            return None
    return ours


@dataclass
class JobOutcome:
    num: int
    overrides: list[str]
    setting: str  # the overrides that vary across the sweep
    status: str
    run_dir: Path
    reason: str | None
    final: dict[str, Any]
    slurm: dict[str, Any] | None = None  # job id, state, log paths, for hydra/launcher=slurm
    objective_name: str = "val/loss"  # in a search: sweep.objective
    objective: float | None = None  # in a search: the value Optuna was told
    rank: int | None = None  # in a search: 1 = the best finished trial

    @property
    def ok(self) -> bool:
        return self.status == "finished"

    @property
    def metric(self) -> tuple[str, Any]:
        """What the table shows of the job: its objective in a search, else key_metric."""
        return key_metric(self.final) if self.objective is None else (self.objective_name, self.objective)


def key_metric(final: dict[str, Any]) -> tuple[str, Any]:
    for key in ("val/loss", "train/loss"):
        if key in final:
            return key, final[key]
    return "val/loss", None


def batch_reason(plan: SweepPlan) -> str | None:
    """None when this plan's jobs train as batches of members in this process (the one backend),
    else why not."""
    if not plan.jobs[0].cfg.sweep.vectorize:
        return "sweep.vectorize=false"
    if plan.search is not None:
        return f"hydra/sweeper={plan.search.sweeper} picks each trial after the ones before"
    if plan.launcher != "basic":
        return f"hydra/launcher={plan.launcher} runs one job per member"
    return why_not([job.cfg for job in plan.jobs])
