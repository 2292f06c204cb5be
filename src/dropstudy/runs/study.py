"""A study: every arm of `study.arms` trained as its own run (execute.train_run) on the same
data and seed, then the comparison drawn and recorded in study.json."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dropstudy.data.datasets import Dataset, load_dataset
from dropstudy.engine.runtime import seed_everything
from dropstudy.model.dropout import arm_label
from dropstudy.report import plots
from dropstudy.report.curves import split_points
from dropstudy.report.html import write_study_page
from dropstudy.runs.execute import RunResult, train_run
from dropstudy.store.failures import describe
from dropstudy.store.rundir import ENDED, RunDir, read_status, write_json_atomic
from dropstudy.store.text import flatten
from dropstudy.tracking.wandb_run import BackgroundTracker, make_tracker

log = logging.getLogger("dropstudy")

@dataclass
class StudyResult:
    study_dir: Path
    arms: list[RunResult]
    figures: dict[str, Path]
    group: str
    status: str = "finished"
    # Where the study's time went (study_timings), and when it started (time.perf_counter()).
    timings: dict[str, float] = field(default_factory=dict)
    started: float = 0.0


# What each part of a study's time is called in its account (study_timings), from the arms' timings_s.
STUDY_PARTS = {"set-up": ("data", "setup"), "W&B": ("wandb",), "training": ("train", "eval"), "logging": ("log",),
               "checkpoints": ("checkpoint",), "epoch bookkeeping": ("bookkeeping",), "figures": ("figures",)}


def study_timings(arms: list[RunResult], comparison_s: float) -> dict[str, float]:
    """The arms' timings summed into the parts a user recognises, and the comparison's time."""
    parts = {part: sum(arm.timings.get(k, 0.0) for arm in arms for k in keys) for part, keys in STUDY_PARTS.items()}
    return {**parts, "comparison": comparison_s}


@dataclass
class ArmRecord:
    """What the study's record and comparison figures need of one arm, whether it was just
    trained (`from_result`) or read back from its run directory by `dropstudy resume`."""

    label: str
    run_dir: Path
    status: str  # a run status, or "not run" for an arm the study never reached
    final: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    fit: plots.FitCurve | None = None

    @classmethod
    def from_result(cls, result: RunResult) -> "ArmRecord":
        outcome = result.outcome
        return cls(result.label, result.run_dir, result.status, outcome.final if outcome else {},
                   outcome.rows if outcome else [], result.fit)


@dataclass
class StudyArm:
    label: str
    cfg: DictConfig
    run_dir: Path
    overrides: list[str]  # what the arm's .hydra/overrides.yaml holds


def study_arms(cfg: DictConfig, study_dir: Path, overrides: list[str]) -> list[StudyArm]:
    """Each arm of study.arms: the study's config with its dropout, in study_dir/<label>."""
    arms = []
    for arm in cfg.study.arms:
        arm_cfg = copy.deepcopy(cfg)
        with open_dict(arm_cfg):
            arm_cfg.model.dropout = arm
        label = arm_label(arm, cfg.model.dropout_kind)
        dropout = OmegaConf.to_container(arm_cfg.model)["dropout"]
        arms.append(StudyArm(label, arm_cfg, study_dir / label, [*overrides, f"model.dropout={dropout}"]))
    return arms


def study_group(cfg: DictConfig, study_dir: Path) -> str:
    return cfg.tracker.group or f"{cfg.experiment}-study-{study_dir.name}"


def study_status(statuses: list[str]) -> str:
    """finished only when every arm finished; interrupted while an arm is left to train or to
    resume; else failed, or diverged when that is all that went wrong."""
    if all(s == "finished" for s in statuses):
        return "finished"
    if any(s in ("interrupted", "not run", "running") for s in statuses):
        return "interrupted"
    return "diverged" if all(s in ENDED for s in statuses) else "failed"


def run_study(cfg: DictConfig, study_dir: Path, overrides: list[str]) -> StudyResult:
    """Every arm of study.arms on the same data and seed, one W&B group, then the comparison."""
    started = time.perf_counter()
    group = study_group(cfg, study_dir)
    arms = study_arms(cfg, study_dir, overrides)
    # The record exists from the start, so a study stopped in any way is found by `resume`.
    write_study_record(study_dir, cfg, group, "running", [ArmRecord(a.label, a.run_dir, "not run") for a in arms])
    results: list[RunResult] = []
    try:
        for arm in arms:
            RunDir(arm.run_dir).write_config(arm.cfg, arm.overrides)
            log.info(f"study arm {len(results) + 1}/{len(arms)}: {arm.label} -> {arm.run_dir}")
            result = train_run(arm.cfg, arm.run_dir, overrides, group=group, job_type=arm.label, extra_tags=("study",))
            results.append(result)
            if result.status == "interrupted":
                break
        records = [ArmRecord.from_result(r) for r in results]
        records += [ArmRecord(arm.label, arm.run_dir, "not run") for arm in arms[len(results):]]
        clock = time.perf_counter()
        figures, status = conclude_study(cfg, study_dir, group, records)
    except BaseException as exc:
        record_stopped_study(study_dir, cfg, group, arms, exc)
        raise
    timings = study_timings(results, time.perf_counter() - clock)
    return StudyResult(study_dir, results, figures, group, status, timings, started)


def conclude_study(
    cfg: DictConfig, study_dir: Path, group: str, arms: list[ArmRecord], data: Dataset | None = None
) -> tuple[dict[str, Path], str]:
    """The study's comparison figures (also to the W&B comparison run) and study.json, from
    its arms as they stand; run at the end of `study` and again by every `resume` that changes
    an arm. Returns the figures and the study's status."""
    out = RunDir(study_dir)
    record_path = study_dir / "study.json"
    previous = json_or_empty(record_path).get("wandb", {})
    # A redrawn study logs into the same comparison run, one step further on (W&B drops a
    # step it has already seen).
    step = previous.get("step", -1) + 1 if previous.get("run_id") else 0
    # The comparison run starts while its figures are drawn (the arms' runs are finished by now,
    # so it needs no other run to finish: shared_process).
    comparison = BackgroundTracker(lambda: make_tracker(
        cfg.tracker,
        run_dir=study_dir,
        group=group,
        job_type="comparison",
        tags=[cfg.experiment, "study", "comparison"],
        name=f"{group}-comparison",
        config=comparison_config(cfg, arms),
        resume_id=previous.get("run_id"),
        shared_process=True,
    ))
    try:
        started = [a for a in arms if a.status != "not run"]
        figures = draw_study_figures(cfg, out, started, data)
        write_study_page(study_dir, figures)
    except BaseException:
        comparison.finish(exit_code=1)
        raise
    comparison.log_images({f"study/{k}": v for k, v in figures.items()}, epoch=0, step=step)
    comparison.finish()
    status = study_status([a.status for a in arms])
    write_study_record(study_dir, cfg, group, status, arms, figures,
                       {"run_id": comparison.run_id, "step": step, "sync": comparison.sync_command})
    return figures, status


def comparison_config(cfg: DictConfig, arms: list[ArmRecord]) -> dict[str, Any]:
    """The comparison run's W&B config: what its arms share, the arms (study.arms, their labels
    and run dirs) and the study's seed as study.seed; no model.dropout and no seed, so that
    grouping runs by dropout or seed never counts the comparison as one more arm."""
    shared = flatten(OmegaConf.to_container(cfg, resolve=True))
    del shared["model.dropout"]  # the one key study_arms sets per arm
    seed = shared.pop("seed")
    return {**shared, "study.seed": seed, "study.arm_labels": [a.label for a in arms],
            "study.run_dirs": [str(a.run_dir) for a in arms]}


def draw_study_figures(cfg: DictConfig, out: RunDir, started: list[ArmRecord], data: Dataset | None) -> dict[str, Path]:
    """The arms side by side: learning curves, weight norms and, for regression, the fits; each
    as PNG and, beside it, SVG (what report.html inlines)."""
    title = f"{cfg.experiment}: " + " vs ".join(a.label for a in started) + f", seed {cfg.seed}"
    if cfg.data.get("synthetic"):
        title += " (SYNTHETIC data)"
    arm_rows = {a.label: a.rows for a in started if a.rows}
    figures = {"study_curves": plots.study_curves(arm_rows, out.plot_path("study_curves.png"), title, svg=True)}
    if plots.has_weight_norms(arm_rows):
        figures["weight_norms"] = plots.weight_norms(arm_rows, out.plot_path("weight_norms.png"), title, svg=True)
    fits = [a.fit for a in started if a.fit is not None]
    if fits:
        if data is None:
            seed_everything(cfg.seed)
            data = load_dataset(cfg.data, torch.device("cpu"), log.info)
        figures["regression_fit"] = plots.regression_fit(
            split_points(data.train), split_points(data.test), fits, out.plot_path("regression_fit.png"), title, svg=True
        )
    return figures


def record_stopped_study(study_dir: Path, cfg: DictConfig, group: str, arms: list[StudyArm],
                         exc: BaseException) -> None:
    """study.json when the study stops on an exception (a full disk, a second Ctrl-C's
    KeyboardInterrupt outside training): failed or interrupted, why, and each arm as its own
    summary.json says; if the disk refuses this write too, the error says so."""

    reason = describe(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    records = []
    for arm in arms:
        status, summary = read_status(arm.run_dir) if (arm.run_dir / "summary.json").is_file() else ("not run", {})
        records.append(ArmRecord(arm.label, arm.run_dir, status, summary.get("final") or {}))
    try:
        write_study_record(study_dir, cfg, group, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                           records, reason=reason)
    except OSError as record_exc:
        exc.add_note(f"study.json still says running: {describe(record_exc)}")


def write_study_record(
    study_dir: Path,
    cfg: DictConfig,
    group: str,
    status: str,
    arms: list[ArmRecord],
    figures: dict[str, Path] | None = None,
    comparison: dict[str, Any] | None = None,
    reason: str | None = None,
) -> None:
    write_json_atomic(
        study_dir / "study.json",
        {
            "experiment": cfg.experiment,
            "group": group,
            "status": status,
            **({"reason": reason} if reason else {}),
            "arms": [{"label": a.label, "run_dir": str(a.run_dir), "status": a.status, "final": a.final}
                     for a in arms],
            "figures": {k: str(v) for k, v in (figures or {}).items()},
            "wandb": comparison or {},
        },
    )


def json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
