"""Sweeps: a grid of `train` jobs as a Hydra multirun on any launcher, and the table at the end.

`plan_sweep` expands the overrides exactly as Hydra's basic sweeper will (its override parser
and job list), composes and checks every job's config and works out each job's run directory,
all before anything is launched; bad input anywhere in the grid is a `ConfigError`.
`launch_multirun` then hands the same overrides to a `@hydra.main` task with `--multirun`, so
the launcher (basic, joblib, submitit) owns the jobs. `SweepJob` is what each job runs, in
whatever process the launcher picks: one `train_run`, its own W&B run in the sweep's group,
and a small picklable record back (in an Optuna search, `dropstudy.search`, the objective);
started again in a run dir it wrote before (SLURM requeued it, `dropstudy.slurm`), it
continues that run from its checkpoint. The table is built from each job's summary.json, the
source of truth whichever process wrote it.

With `sweep.vectorize` on, a grid whose members can train together (`backend.why_not`) is
trained in this process instead, into the same run directories, in batches of at most
`sweep.max_members` members (`train_batches`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import signal
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict

from dropstudy.batching import why_not
from dropstudy.config import ConfigError, conf_dir, explain_composition_error, hydra_value, validate
from dropstudy.execute import Batch, Member, train_members
from dropstudy.rundir import RunDir, claim_run_dir

if TYPE_CHECKING:
    from dropstudy.search import SearchSpec

log = logging.getLogger("dropstudy")

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


def _hydra():
    from hydra.core.global_hydra import GlobalHydra

    from dropstudy.hydra_internals import main_hydra

    GlobalHydra.instance().clear()
    return main_hydra("sweep", conf_dir())


def _is_hydra_override(arg: str) -> bool:
    return arg.lstrip("+~").startswith(("hydra/", "hydra."))


def sweep_dir_override(sweep_dir: str) -> str:
    """hydra.sweep.dir=DIR as Hydra's override parser reads it back (quoted unless plain)."""
    return f"hydra.sweep.dir={hydra_value(sweep_dir)}"


def plan_sweep(overrides: list[str], new: bool = True) -> SweepPlan:
    """Every job of the multirun `overrides` describe, composed and validated, with its run dir."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    from dropstudy.hydra_internals import apply_overrides, split_sweep_arguments

    launcher = hydra_choice("hydra/launcher", overrides)
    check_launcher(launcher)
    sweeper = hydra_choice("hydra/sweeper", overrides)
    check_sweeper(sweeper)
    if sweeper != "basic":
        from dropstudy.search import plan_search

        return plan_search(overrides, sweeper, new)
    setup_globals()
    args = [*overrides, "hydra.job.name=sweep"]
    try:
        hydra = _hydra()
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
            task_args = [a for a in job_args if not _is_hydra_override(a)]
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
    from dropstudy.rundir import RunDirClaimError, refuse_used

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


# --------------------------------------------------------------------------- running the jobs


@dataclass
class SweepJob:
    """One job of a sweep, run by the launcher in any process: it must pickle (cloudpickle for
    joblib and submitit), so it holds plain values only and returns a small dict."""

    group: str
    objective: str | None = None  # set in an Optuna search: the job returns this metric's value
    launched_from: int = field(default_factory=os.getpid)  # the `dropstudy sweep` process
    # The signal that interrupted a job in this process, if one did (a class attribute: one per process).
    stopped_by: ClassVar[int | None] = None

    def __call__(self, cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Any:
        record = self.train(cfg, run_dir, overrides)
        if self.objective is None:
            return record
        from dropstudy.rundir import read_status
        from dropstudy.search import TrialFailed, objective_value

        value = objective_value(read_status(run_dir)[1], self.objective, record["status"])
        if value != value:
            # Hydra hands the exception to the sweeper, which records the trial as failed and goes on.
            raise TrialFailed(f"{run_dir}: {record['status']}, no {self.objective}")
        return value

    def train(self, cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
        from dropstudy.rundir import claim_run_dir, read_status
        from dropstudy.execute import train_run

        if SweepJob.stopped_by is not None:
            from dropstudy.rundir import RunDir
            from dropstudy.runtime import Interrupted

            # A worker process that was interrupted starts none of the jobs queued behind; each
            # says so (Hydra made its directory already), and `dropstudy resume` starts it.
            name = signal.Signals(SweepJob.stopped_by).name
            RunDir(run_dir).write_summary({"status": "interrupted", "epoch": 0,
                                           "reason": f"{name}: the sweep stopped before this job started"})
            raise Interrupted(SweepJob.stopped_by)
        try:
            # The sweep dir was new when the sweep claimed it; the job's lock keeps others out of its run.
            with claim_run_dir(run_dir, new=False):
                if (run_dir / "summary.json").is_file():
                    result = self._continue(cfg, run_dir, overrides)
                    if result is None:
                        return {"run_dir": str(run_dir), "status": read_status(run_dir)[0]}
                else:
                    result = train_run(cfg, run_dir, overrides, group=self.group, extra_tags=("sweep",))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one job's failure never stops the others
            log.exception(f"sweep job {run_dir} failed: {type(exc).__name__}: {exc}")
            return {"run_dir": str(run_dir), "status": read_status(run_dir)[0]}
        finally:
            self._release_wandb()
        if result.status == "interrupted":
            from dropstudy.runtime import Interrupted

            if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
                from dropstudy.slurm import hand_back_to_slurm

                hand_back_to_slurm(result.exit_code - 128)
            # Ctrl-C/SIGTERM: the run stopped cleanly; stop launching the remaining jobs too,
            # and let the sweep exit with the signal's code.
            SweepJob.stopped_by = result.exit_code - 128
            raise Interrupted(result.exit_code - 128)
        return {"run_dir": str(run_dir), "status": result.status}

    def _continue(self, cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Any:
        """The same job started again in a run dir an earlier attempt of it wrote: SLURM requeued
        it (`scontrol requeue`, a preemption, a time limit). Continues that attempt with the
        single-run resume path, from its last checkpoint (or from scratch without one); None when
        the earlier attempt had concluded."""
        from dropstudy.resume import plan_step, run_step

        step = plan_step(f"sweep job {run_dir}", run_dir, cfg, overrides, "it stopped before its first checkpoint")
        restarts = os.environ.get("SLURM_RESTART_COUNT")
        log.info(step.describe() + (f" (SLURM restart {restarts})" if restarts else ""))
        if step.action == "keep":
            return None
        return run_step(step, group=self.group, job_type=None, extra_tags=("sweep",))

    def _release_wandb(self) -> None:
        """In a worker process (joblib's loky, submitit), shut W&B's service down with the job:
        train_run has finished the run, and a worker that loky reuses or kills later must not
        hold a W&B service from an earlier job (the known joblib/wandb crash)."""
        if os.getpid() != self.launched_from and "wandb" in sys.modules:
            try:
                sys.modules["wandb"].teardown()
            except Exception as exc:
                log.warning(f"W&B teardown after the job failed ({type(exc).__name__}: {exc})")


def launch_multirun(plan: SweepPlan, job: SweepJob) -> None:
    """Run the plan's jobs as a Hydra multirun on its launcher (the same task `train` runs)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from dropstudy.slurm import SLURM_LAUNCHERS, wait_for_slurm_jobs

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def sweep_job(cfg: DictConfig) -> dict[str, Any]:
        hc = HydraConfig.get()
        return job(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))

    saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [saved_argv[0], "--multirun", *plan.argv]
    if plan.launcher in SLURM_LAUNCHERS or plan.search is not None:
        # Raised rather than printed by Hydra (and exit 1): a job's failure is the table's to report.
        os.environ["HYDRA_FULL_ERROR"] = "1"
    worker_launcher = plan.launcher in WORKER_LAUNCHERS
    try:
        with signals_reach_workers() if worker_launcher else nullcontext() as stop:
            try:
                sweep_job()
            finally:
                if stop and stop.signum is not None:
                    # The workers checkpointed and stopped (or died before training began);
                    # either way the sweep was interrupted, and says so with the signal's code.
                    from dropstudy.runtime import Interrupted

                    raise Interrupted(stop.signum)
    except Exception as exc:
        if plan.search is not None and plan.launcher not in SLURM_LAUNCHERS:
            # e.g. Optuna's "no trials are completed yet" when every trial failed.
            log.error(f"the {plan.search.sweeper} search stopped: {type(exc).__name__}: {exc}")
            return
        if plan.launcher not in SLURM_LAUNCHERS:
            raise
        # submitit raises at the first job that ended without a result (it failed on the node,
        # was cancelled, ran out of memory; or SLURM is requeueing it); the table says which,
        # once every job of the sweep has left the queue.
        log.warning(f"a SLURM job of the sweep ended without a result: {str(exc).strip().splitlines()[0]}; "
                    "waiting for the sweep's jobs to leave the queue (a requeued one runs again)")
        wait_for_slurm_jobs(plan.sweep_dir, poll_s=2.0)
    else:
        if plan.launcher in SLURM_LAUNCHERS:
            # A job's result comes a moment before SLURM records it COMPLETED; the table shows the latter.
            wait_for_slurm_jobs(plan.sweep_dir, timeout_s=60)
    finally:
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error


# Launchers whose jobs run in worker processes of this one (SLURM's run on their nodes).
WORKER_LAUNCHERS = ("joblib", "submitit_local")


class StopRequest:
    signum: int | None = None


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (Linux's /proc; none where there is no /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it exited while we looked
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


@contextmanager
def signals_reach_workers() -> Iterator[StopRequest]:
    """SIGTERM to the sweep's process (kill, a scheduler) goes on to the launcher's worker
    processes, so that their training checkpoints and reports the interruption back as its
    result; left alone, this process died and its workers trained on, orphaned. Ctrl-C in a
    terminal reaches every process of the group by itself: it is only noted here (passed on, it
    would be each worker's second and stop it at once), and this process waits for the workers'
    answers instead of stopping the pool under them (which kills them mid-checkpoint)."""
    stop = StopRequest()

    def note(signum: int, frame: Any) -> None:
        stop.signum = signum

    def forward(signum: int, frame: Any) -> None:
        stop.signum = signum
        for pid in child_pids(os.getpid()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, note), signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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


def train_batches(plan: SweepPlan) -> list[Any]:
    """Every job as a member of a batch, each in the run dir the launcher would use: batches of at
    most sweep.max_members members, one after another. Stops after a batch that was interrupted;
    returns every trained member's RunResult."""
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(plan.master, plan.sweep_dir / "multirun.yaml")
    size = plan.jobs[0].cfg.sweep.max_members
    results: list[Any] = []
    for number, start in enumerate(range(0, len(plan.jobs), size)):
        members = []
        with ExitStack() as held:
            for job in plan.jobs[start:start + size]:
                held.enter_context(claim_run_dir(job.run_dir, new=False))
                RunDir(job.run_dir).write_config(job.cfg, job.overrides)
                members.append(Member(cfg=job.cfg, run_dir=job.run_dir, overrides=job.overrides))
            batch_results = train_members(members, Batch(group=plan.group, extra_tags=("sweep",),
                                                         sweep=(number, plan.sweep_dir)))
        results.extend(batch_results)
        if any(r.status == "interrupted" for r in batch_results):
            break
    return results


# --------------------------------------------------------------------------- the outcome


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


def collect_outcomes(plan: SweepPlan) -> list[JobOutcome]:
    """Every job's outcome from its run dir (and SLURM's record); a search's trials ranked by
    their objective, best first, the unfinished after them."""
    from dropstudy.rundir import read_status
    from dropstudy.search import objective_value, trial_jobs
    from dropstudy.slurm import SLURM_LAUNCHERS, explain_slurm_failure, slurm_jobs

    if plan.search is None:
        jobs = [(job.num, job.overrides, job.run_dir) for job in plan.jobs]
        varying = set(plan.varying)
    else:
        jobs = trial_jobs(plan.sweep_dir)
        varying = set(plan.search.space)
    cluster = slurm_jobs(plan.sweep_dir) if plan.launcher in SLURM_LAUNCHERS else {}
    outcomes = []
    for num, overrides, run_dir in jobs:
        status, summary = read_status(run_dir)
        setting = " ".join(o for o in overrides if o.partition("=")[0] in varying)
        outcome = JobOutcome(num, overrides, setting, status, run_dir, summary.get("reason"),
                             summary.get("final", {}), cluster.get(num))
        if outcome.slurm is not None:
            explain_slurm_failure(outcome)
        if plan.search is not None:
            outcome.objective_name = plan.search.objective
            outcome.objective = objective_value(summary, plan.search.objective, outcome.status)
        outcomes.append(outcome)
    if plan.search is not None:
        sign = 1 if plan.search.direction == "minimize" else -1
        ranked = sorted((o for o in outcomes if o.objective == o.objective), key=lambda o: (sign * o.objective, o.num))
        for rank, outcome in enumerate(ranked, 1):
            outcome.rank = rank
        outcomes = ranked + [o for o in outcomes if o.rank is None]
    return outcomes


def key_metric(final: dict[str, Any]) -> tuple[str, Any]:
    for key in ("val/loss", "train/loss"):
        if key in final:
            return key, final[key]
    return "val/loss", None


def write_sweep_json(plan: SweepPlan, outcomes: list[JobOutcome], interrupted: bool, mode: str,
                     extra: dict[str, Any] | None = None) -> Path:
    """The sweep's table as sweep.json (a search's best trial also as best.json); `extra` adds
    keys (`resume` records its resumes)."""
    from dropstudy.rundir import write_json_atomic
    from dropstudy.search import best_trial

    best = best_trial(plan, outcomes) if plan.search is not None else None
    if best is not None:
        write_json_atomic(plan.sweep_dir / "best.json", best)

    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    path = plan.sweep_dir / "sweep.json"
    write_json_atomic(
        path,
        {
            "sweep_dir": str(plan.sweep_dir),
            "group": plan.group,
            "launcher": plan.launcher,
            "mode": mode,
            "overrides": plan.argv,
            "interrupted": interrupted,
            "failed": [o.num for o in outcomes if not o.ok],
            "jobs": [
                {"num": o.num, "overrides": o.overrides, "setting": o.setting, "status": o.status,
                 "reason": o.reason, "run_dir": str(o.run_dir), "final": o.final,
                 **({"slurm": o.slurm} if o.slurm is not None else {}),
                 **({"objective": None if o.objective != o.objective else o.objective, "rank": o.rank}
                    if plan.search is not None else {})}
                for o in outcomes
            ],
            **({"search": {**asdict(plan.search), "best": best_trial(plan, outcomes)}} if plan.search else {}),
            **(extra or {}),
        },
    )
    return path


# --------------------------------------------------------------------------- W&B sweeps

WANDB_METHODS = ("grid", "random", "bayes")
# What a W&B agent runs for each point: `dropstudy train key=value ...`, Hydra overrides as-is.
AGENT_COMMAND = ["${env}", "${interpreter}", "-m", "dropstudy", "train", "${args_no_hyphens}"]


def _wandb_value(value: Any, text: str) -> Any:
    """Numbers stay numbers (bayes needs them); anything else is passed as its Hydra text, which
    the agent writes back verbatim as key=TEXT."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return text


def wandb_sweep_config(overrides: list[str], method: str, metric: str,
                       goal: str) -> tuple[dict[str, Any], list[str]]:
    """A W&B sweep config for `overrides` (its name, project and entity come from the composed
    grid: the caller adds them), and the overrides that check its grid (and place the file:
    hydra.sweep.dir). Comma lists, range() and choice() become `values`, interval() a
    uniform `min`/`max` (random, bayes), everything else a fixed `value`; `~key` deletions go
    into the command itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType

    if method not in WANDB_METHODS:
        raise ConfigError(f"--method {method}: use one of {', '.join(WANDB_METHODS)}.")
    if goal not in ("minimize", "maximize"):
        raise ConfigError(f"--goal {goal}: use minimize or maximize.")
    parser = OverridesParser.create()
    parameters: dict[str, Any] = {}
    command = list(AGENT_COMMAND)
    checks: list[str] = []
    for arg in overrides:
        if arg.startswith("hydra.sweep.dir="):
            checks.append(arg)  # where the sweep config is written, not a parameter
            continue
        if _is_hydra_override(arg):
            raise ConfigError(f"{arg}: W&B agents run `dropstudy train` on their own machines; Hydra's "
                              "launcher and sweep settings do not apply there. Leave it out of --wandb.")
        try:
            override = parser.parse_override(arg)
        except Exception as exc:
            raise ConfigError(f"{arg}: {explain_composition_error(exc)}") from exc
        key = override.get_key_element()
        if override.type == OverrideType.DEL:
            command.insert(-1, arg)
            checks.append(arg)
        elif override.value_type == ValueType.INTERVAL_SWEEP:
            if method == "grid":
                raise ConfigError(f"{arg}: --method grid needs a list of values (a,b,c, range() or choice()); "
                                  "interval() needs --method random or bayes.")
            interval = override.value()
            parameters[key] = {"distribution": "uniform", "min": interval.start, "max": interval.end}
            checks.append(f"{key}={interval.start},{interval.end}")
        elif override.is_discrete_sweep():
            values = list(override.sweep_iterator())
            texts = list(override.sweep_string_iterator())
            parameters[key] = {"values": [_wandb_value(v, t) for v, t in zip(values, texts)]}
            checks.append(arg)
        else:
            parameters[key] = {"value": _wandb_value(override.value(), override.get_value_element_as_str())}
            checks.append(arg)
    if not any("values" in p or "min" in p for p in parameters.values()):
        raise ConfigError("--wandb: nothing to sweep; give at least one key a list of values, "
                          "e.g. model.dropout=0,0.25,0.5 seed=range(0,5).")
    config: dict[str, Any] = {
        "program": "dropstudy",  # the agent requires the key; the command below is what runs
        "method": method,
        "metric": {"name": metric, "goal": goal},
        "parameters": parameters,
        "command": command,
    }
    return config, checks


def write_wandb_sweep(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
