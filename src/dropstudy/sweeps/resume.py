"""`dropstudy resume SWEEP_DIR`: each job of a sweep as its files say it stands, kept, resumed or started."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dropstudy.config.checks import ConfigError
from dropstudy.runs.resume import ResumeError, Step, plan_step, run_step, run_steps, saved_overrides
from dropstudy.runs.study import json_or_empty
from dropstudy.sweeps.plan import SweepPlan, setting, sweep_dir_override
from dropstudy.sweeps.search import plan_sweep



@dataclass
class SweepResume:
    plan: SweepPlan
    mode: str  # how the sweep first ran: basic, joblib, ..., batched (vectorized before)
    record: dict[str, Any]
    steps: list[Step]
    interrupted: bool = False


def sweep_argv(sweep_dir: Path, record: dict[str, Any]) -> list[str]:
    """The overrides the sweep was planned from (sweep.json, else Hydra's multirun.yaml), with
    the sweep dir named as given here, so the jobs map onto the directories that exist."""
    argv = record.get("overrides")
    if argv is None:
        master = OmegaConf.load(sweep_dir / "multirun.yaml")
        argv = [*master.hydra.overrides.hydra, *master.hydra.overrides.task]
    own = ("hydra.sweep.dir=", "hydra.job.name=", "hydra.mode=")
    return [str(a) for a in argv if not str(a).startswith(own)] + [sweep_dir_override(str(sweep_dir))]


def plan_sweep_resume(sweep_dir: Path) -> SweepResume:
    record = json_or_empty(sweep_dir / "sweep.json")
    try:
        plan = plan_sweep(sweep_argv(sweep_dir, record), new=False)
    except ConfigError as exc:
        raise ResumeError(f"{sweep_dir}: its sweep cannot be planned again from its overrides: {exc}") from exc
    except Exception as exc:
        raise ResumeError(f"{sweep_dir}/multirun.yaml: not a readable Hydra multirun record "
                          f"({type(exc).__name__}: {exc}).") from exc
    if plan.search is not None:
        raise ResumeError(f"{sweep_dir}: an {plan.search.sweeper} search is not resumed (each trial was picked "
                          "from the ones before it); its finished trials stand as they are, and a new search "
                          "starts with dropstudy sweep.")
    recorded = record.get("jobs", [])
    if recorded and (len(recorded) != len(plan.jobs) or any(
            r["overrides"] != job.overrides
            or Path(r["run_dir"]).relative_to(record["sweep_dir"]) != job.run_dir.relative_to(plan.sweep_dir)
            for r, job in zip(recorded, plan.jobs))):
        raise ResumeError(f"{sweep_dir / 'sweep.json'}: its jobs are not those its overrides plan today "
                          "(the configs changed?), so the sweep cannot be resumed.")
    plan.group = record.get("group") or plan.group
    mode = record.get("mode", plan.launcher)
    no_checkpoint = ("the batched sweep wrote no checkpoint" if mode in ("batched", "vectorized")
                     else "it stopped before its first checkpoint")
    varying = set(plan.varying)
    steps = []
    for job in plan.jobs:
        named = setting(job.overrides, varying)
        name = f"member {job.num} ({named})" if mode in ("batched", "vectorized") else f"#{job.num} ({named})"
        if (job.run_dir / ".hydra" / "overrides.yaml").is_file() and saved_overrides(job.run_dir) != job.overrides:
            raise ResumeError(f"{job.run_dir / '.hydra' / 'overrides.yaml'}: not the overrides the sweep plans "
                              f"for job {job.num} ({job.label}), so the sweep cannot be resumed.")
        steps.append(plan_step(name, job.run_dir, job.cfg, job.overrides, no_checkpoint,
                               check_drift=True))
    return SweepResume(plan, mode, record, steps)


def resume_sweep(resumption: SweepResume) -> SweepResume:
    group = resumption.plan.group
    resumption.interrupted = run_steps(
        resumption.steps, lambda s: run_step(s, group=group, job_type=None, extra_tags=("sweep",)))
    return resumption
