"""Resuming a study or a sweep: what `dropstudy resume STUDY_DIR|SWEEP_DIR` does beyond one run.

Each run of the directory is taken as its files say it stands: a finished (or diverged) run is
kept untouched; an interrupted or failed one that has `checkpoints/last.pt` continues from it
(the single-run resume, `execute.train_run(..., resume=True)`); one that never started, or
stopped before its first checkpoint, is trained from the start with its saved or planned
config. Everything is checked first (`plan_study_resume`, `plan_sweep_resume`), so a refused
resume changes nothing; the runs are then trained one after another in this process. A study
ends by redrawing its comparison and rewriting study.json (`study.conclude_study`), a sweep
by rewriting its table (sweep.json); `update_study` does the former after one arm was resumed
by hand."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from dropstudy.config.checks import ConfigError, validate, validate_study
from dropstudy.data.datasets import load_dataset
from dropstudy.engine.runtime import seed_everything
from dropstudy.model.networks import build_model
from dropstudy.report.curves import regression_fit_curve
from dropstudy.runs.execute import RunResult, train_run
from dropstudy.runs.study import ArmRecord, conclude_study, json_or_empty, study_arms, study_group
from dropstudy.store.rundir import ENDED, RunDir, RunDirError, computation_differences, read_status

log = logging.getLogger("dropstudy")


class ResumeError(Exception):
    """The directory cannot be resumed as it is; the message names the file and why."""


def directory_kind(path: Path) -> str:
    """`sweep`, `study` or `run`: what `dropstudy resume DIR` continues."""
    if (path / "sweep.json").is_file() or (path / "multirun.yaml").is_file():
        return "sweep"
    if (path / "study.json").is_file():
        return "study"
    if RunDir.existing(path).job_name() == "study":
        return "study"  # stopped before it wrote study.json
    return "run"


@dataclass
class Step:
    """What resume does with one run: keep it, resume it from its checkpoint, or start it."""

    name: str  # how the output names it: the arm's label, or the sweep job's "#N overrides"
    run_dir: Path
    status: str  # before this resume
    action: str  # keep | resume | start
    cfg: DictConfig
    overrides: list[str]
    note: str = ""  # why it starts from scratch, or the epoch it resumes after
    result: RunResult | None = None

    def describe(self) -> str:
        """e.g. `dropout-0.5: interrupted, resumes after epoch 400`."""
        verb = {"keep": "kept", "resume": "resumes", "start": "starts"}[self.action]
        if self.action == "start" and self.status != "not run":
            verb = "restarts"
        return f"{self.name}: {self.status}, {verb}" + (f" {self.note}" if self.note else "")


def saved_overrides(run_dir: Path) -> list[str]:
    return RunDir.existing(run_dir).read_overrides()


def plan_step(name: str, run_dir: Path, planned: DictConfig, overrides: list[str], no_checkpoint: str,
              check_drift: bool = False) -> Step:
    """The step for one run dir, checked: a run to resume has a readable checkpoint written by
    its own config. With check_drift (a sweep, whose plan is composed again from the config
    files), a saved config must still compute what the plan does."""
    status, _ = read_status(run_dir)
    if status in ENDED:
        return Step(name, run_dir, status, "keep", planned, overrides)
    cfg = planned
    if RunDir.existing(run_dir).has_config():
        cfg, overrides = RunDir.existing(run_dir).read_config(), saved_overrides(run_dir) or overrides
        differences = computation_differences(OmegaConf.to_container(cfg, resolve=True),
                                              OmegaConf.to_container(planned, resolve=True))
        if check_drift and differences:
            raise ResumeError(
                f"{run_dir / '.hydra' / 'config.yaml'} no longer matches what the configs plan for {name} "
                f"({'; '.join(differences[:3])}): the configs changed since it started, so the runs left "
                "would not be comparable with it. Restore the configs, or start a new directory.")
    if RunDir.existing(run_dir).has_checkpoint():
        state = RunDir.existing(run_dir).read_checkpoint(cfg)
        run = RunDir.existing(run_dir)
        run.read_metrics()  # a damaged record refuses the whole resume, before anything is written
        run.read_provenance()
        torn = f" ({run.metrics_path.name} line {run.torn_line} is half-written: dropped)" if run.torn_tail() else ""
        return Step(name, run_dir, status, "resume", cfg, overrides, f"after epoch {state['epoch']}{torn}")
    note = "(never started)" if status == "not run" else f"from scratch: {no_checkpoint}"
    return Step(name, run_dir, status, "start", cfg, overrides, note)


def run_step(step: Step, *, group: str, job_type: str | None, extra_tags: tuple[str, ...]) -> RunResult:
    """Resume or start one run in its own directory."""
    if step.action == "resume":
        return train_run(step.cfg, step.run_dir, step.overrides, group=group, job_type=job_type,
                         extra_tags=extra_tags, resume=True)
    rd = RunDir(step.run_dir)
    rd.forget_attempt()
    if not rd.has_config():
        rd.write_config(step.cfg, step.overrides)
    return train_run(step.cfg, step.run_dir, step.overrides, group=group, job_type=job_type, extra_tags=extra_tags)


def run_steps(steps: list[Step], train: Callable[[Step], RunResult]) -> bool:
    """Train every step that is not kept, in order; stop at an interruption (returns True).
    A run that fails is logged and the next one starts, as in a sweep."""
    for step in steps:
        if step.action == "keep":
            continue
        log.info(f"{step.describe()} -> {step.run_dir}")
        try:
            step.result = train(step)
        except KeyboardInterrupt:
            return True
        except Exception as exc:  # its summary.json says failed; the others still run
            log.exception(f"{step.name} failed: {type(exc).__name__}: {exc}")
            continue
        if step.result.status == "interrupted":
            return True
    return False


@dataclass
class StudyResume:
    study_dir: Path
    cfg: DictConfig
    group: str
    steps: list[Step]
    status: str = ""
    interrupted: bool = False
    figures: dict[str, Path] = field(default_factory=dict)


def load_study(study_dir: Path) -> tuple[DictConfig, list[str], str]:
    """The study's own config (what `dropstudy study` composed), its overrides and W&B group."""
    path = study_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ResumeError(f"{path}: missing, so the arms {study_dir} never reached cannot be rebuilt.")
    try:
        cfg = OmegaConf.load(path)
        validate(cfg)
        validate_study(cfg)
    except ConfigError as exc:
        raise ResumeError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise ResumeError(f"{path}: not a readable dropstudy config ({type(exc).__name__}: {exc}).") from exc
    group = json_or_empty(study_dir / "study.json").get("group") or study_group(cfg, study_dir)
    return cfg, saved_overrides(study_dir), group


def plan_study_resume(study_dir: Path) -> StudyResume:
    cfg, overrides, group = load_study(study_dir)
    steps = [plan_step(arm.label, arm.run_dir, arm.cfg, arm.overrides, "it stopped before its first checkpoint")
             for arm in study_arms(cfg, study_dir, overrides)]
    return StudyResume(study_dir, cfg, group, steps)


def resume_study(plan: StudyResume) -> StudyResume:
    """Train what is left of the study, then redraw its comparison and rewrite study.json."""
    plan.interrupted = run_steps(
        plan.steps, lambda s: run_step(s, group=plan.group, job_type=s.name, extra_tags=("study",)))
    plan.figures, plan.status = conclude_from_disk(plan.study_dir, plan.cfg, plan.group, plan.steps)
    return plan


def update_study(study_dir: Path, arm: RunResult) -> tuple[dict[str, Path], str] | None:
    """After one arm was resumed by hand: its study's record and figures, when study_dir holds a
    study.json that lists the arm; None otherwise."""
    record = json_or_empty(study_dir / "study.json")
    if not any(Path(a.get("run_dir", "")).name == arm.run_dir.name for a in record.get("arms", [])):
        return None
    cfg, overrides, group = load_study(study_dir)
    steps = []
    for planned in study_arms(cfg, study_dir, overrides):
        status, _ = read_status(planned.run_dir)
        step = Step(planned.label, planned.run_dir, status, "keep", planned.cfg, planned.overrides)
        if planned.run_dir.name == arm.run_dir.name:
            step.result = arm
        steps.append(step)
    return conclude_from_disk(study_dir, cfg, group, steps)


def conclude_from_disk(study_dir: Path, cfg: DictConfig, group: str, steps: list[Step]) -> tuple[dict[str, Path], str]:
    """study.conclude_study over every arm as its run dir now stands (an arm trained in this
    process brings its own record)."""

    data = None
    if cfg.data.name == "regression":  # the fit figure needs the points; nothing else does
        seed_everything(cfg.seed)
        data = load_dataset(cfg.data, torch.device("cpu"), log.info)
    records = [ArmRecord.from_result(s.result) if s.result is not None and s.result.outcome is not None
               else arm_record(s.name, s.run_dir, data) for s in steps]
    return conclude_study(cfg, study_dir, group, records, data)


def arm_record(label: str, run_dir: Path, data: Any) -> ArmRecord:
    """An arm's record read back from its run dir; the regression fit is recomputed from the
    final checkpoint, since a figure cannot be read back into a curve."""
    status, summary = read_status(run_dir)
    if status == "not run":
        return ArmRecord(label, run_dir, status)
    record = ArmRecord(label, run_dir, status, summary.get("final", {}), RunDir(run_dir).read_metrics())
    checkpoint = RunDir.existing(run_dir).checkpoint_path
    if data is not None and checkpoint.is_file():
        try:
            record.fit = fit_from_checkpoint(RunDir.existing(run_dir), label, data)
        except (RunDirError, RuntimeError, KeyError, OSError) as exc:
            log.warning(f"{checkpoint}: not drawn in the comparison ({type(exc).__name__}: {exc})")
    return record


def fit_from_checkpoint(run: RunDir, label: str, data: Any):
    cfg = run.read_config()
    model = build_model(cfg.model)
    model.load_state_dict(run.read_checkpoint()["model"])
    seed_everything(cfg.seed)  # the MC-dropout band's draws
    return regression_fit_curve(model, data, label, cfg.eval.mc_samples)
