"""Sweeps: a grid of `train` jobs as a Hydra multirun on any launcher, and the table at the end.

`plan_sweep` expands the overrides exactly as Hydra's basic sweeper will (its override parser
and job list), composes and checks every job's config and works out each job's run directory,
all before anything is launched; bad input anywhere in the grid is a `ConfigError`.
`launch_multirun` then hands the same overrides to a `@hydra.main` task with `--multirun`, so
the launcher (basic, joblib, submitit) owns the jobs. `SweepJob` is what each job runs, in
whatever process the launcher picks: one `train_run`, its own W&B run in the sweep's group,
and a small picklable record back (in an Optuna search, `sweeps.search`, the objective);
started again in a run dir it wrote before (SLURM requeued it, `sweeps.slurm`), it
continues that run from its checkpoint. The table is built from each job's summary.json, the
source of truth whichever process wrote it.

With `sweep.vectorize` on, a grid whose members can train together (`engine.batching.why_not`) is
trained in this process instead, into the same run directories, in batches of at most
`sweep.max_members` members (`train_batches`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from omegaconf import DictConfig, OmegaConf

from dropstudy.config.compose import conf_dir, hydra_command_line
from dropstudy.engine.runtime import Interrupted
from dropstudy.runs.execute import Batch, Member, train_members, train_run
from dropstudy.runs.resume import plan_step, run_step
from dropstudy.store.failures import describe
from dropstudy.store.rundir import RunDir, claim_run_dir, read_status, write_json_atomic
from dropstudy.sweeps.plan import JobOutcome, SweepPlan, setting
from dropstudy.sweeps.search import TrialFailed, best_trial, objective_value, trial_jobs
from dropstudy.sweeps.slurm import (
    SLURM_LAUNCHERS,
    explain_slurm_failure,
    hand_back_to_slurm,
    slurm_jobs,
    wait_for_slurm_jobs,
)

log = logging.getLogger("dropstudy")


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

        value = objective_value(read_status(run_dir)[1], self.objective, record["status"])
        if value != value:
            # Hydra hands the exception to the sweeper, which records the trial as failed and goes on.
            raise TrialFailed(f"{run_dir}: {record['status']}, no {self.objective}")
        return value

    def train(self, cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
        if SweepJob.stopped_by is not None:
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
            if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
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

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def sweep_job(cfg: DictConfig) -> dict[str, Any]:
        hc = HydraConfig.get()
        return job(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))

    # Raised rather than printed by Hydra (and exit 1) on SLURM and in a search: a job's failure
    # is the table's to report.
    with hydra_command_line(["--multirun", *plan.argv],
                            raise_errors=plan.launcher in SLURM_LAUNCHERS or plan.search is not None):
        run_multirun(plan, sweep_job)


def run_multirun(plan: SweepPlan, sweep_job: Any) -> None:
    """The multirun itself, its workers reached by signals, and what each launcher's end means."""
    worker_launcher = plan.launcher in WORKER_LAUNCHERS
    try:
        with signals_reach_workers() if worker_launcher else nullcontext() as stop:
            try:
                sweep_job()
            finally:
                if stop and stop.signum is not None:
                    # The workers checkpointed and stopped (or died before training began);
                    # either way the sweep was interrupted, and says so with the signal's code.
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


# Launchers whose jobs run in worker processes of this one (SLURM's run on their nodes).
WORKER_LAUNCHERS = ("joblib", "submitit_local")


def mark_unstarted(plan: SweepPlan, signum: int) -> None:
    """After an interrupted multirun, every job that never started says so in its summary.json:
    a worker that was stopped starts none of the jobs queued behind it, and the launcher may drop
    the queue before any worker reaches it (joblib aborts on the first interrupted job), so the
    sweep process records them itself; `dropstudy resume` starts them."""
    if plan.launcher not in WORKER_LAUNCHERS:
        # basic: an unstarted job is `not run`, as the table says; a cluster's queue outlives this
        # process, and its jobs still start and write their own.
        return
    name = signal.Signals(signum).name if signum in signal.valid_signals() else "interrupted"
    for job in plan.jobs:
        if not (job.run_dir / "summary.json").is_file():
            try:
                RunDir(job.run_dir).write_summary({"status": "interrupted", "epoch": 0,
                                                   "reason": f"{name}: the sweep stopped before this job started"})
            except OSError as exc:  # the disk that stopped the sweep may refuse this too
                log.warning(f"{job.run_dir}: not marked interrupted: {describe(exc)}")


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


def collect_outcomes(plan: SweepPlan) -> list[JobOutcome]:
    """Every job's outcome from its run dir (and SLURM's record); a search's trials ranked by
    their objective, best first, the unfinished after them."""

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
        outcome = JobOutcome(num, overrides, setting(overrides, varying), status, run_dir, summary.get("reason"),
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


def write_sweep_json(plan: SweepPlan, outcomes: list[JobOutcome], interrupted: bool, mode: str,
                     extra: dict[str, Any] | None = None) -> Path:
    """The sweep's table as sweep.json (a search's best trial also as best.json); `extra` adds
    keys (`resume` records its resumes)."""

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
            **({"search": {**asdict(plan.search), "best": best}} if plan.search else {}),
            **(extra or {}),
        },
    )
    return path
