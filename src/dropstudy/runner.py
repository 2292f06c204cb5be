"""A run's lifecycle, in one place: from a composed config to a finished run directory.

`train_run` sets up device, seeds, data, model, optimizer and tracker, trains (a `Single`
backend driven by the `Engine`), draws the figures and writes the summary; the tracker is always finished, whatever happens. `run_study`
trains every arm of `study.arms` that way on the same data and seed and draws the comparison.
W&B starts in the background (`tracking.BackgroundTracker`) while the rest is set up, so its
start waits in line only where a call needs the run itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dropstudy import plots
from dropstudy.data import Dataset, load_dataset
from dropstudy.dropout import DropoutSchedule, arm_label, describe_sites
from dropstudy.models import build_model
from dropstudy.failures import describe
from dropstudy.html_report import write_study_page
from dropstudy.rundir import RunDir, RunDirError, check_fits, collect_provenance, now_iso, write_json_atomic
from dropstudy.runtime import FastPaths, describe_device, seed_everything, set_up_process
from dropstudy.tracking import BackgroundTracker, flatten, make_tracker, resolve_mode
from dropstudy.backends import Single
from dropstudy.engine import Engine, MemberRun
from dropstudy.train import NonFiniteLoss, Outcome, make_optimizer
from dropstudy.uncertainty import calibration, mc_forward, predictions, predictive_entropy

log = logging.getLogger("dropstudy")

@dataclass
class RunResult:
    run_dir: Path
    label: str
    status: str
    outcome: Outcome | None
    figures: dict[str, Path] = field(default_factory=dict)
    fit: plots.FitCurve | None = None
    tracker_url: str | None = None
    sync_command: str | None = None
    # Seconds per part of the run (summary.json's timings_s, plus W&B's finish under "wandb").
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None  # the epoch of the checkpoint this run continued from, if it did

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code if self.outcome is not None else 1


@torch.no_grad()
def regression_fit_curve(model: torch.nn.Module, data: Dataset, label: str, mc_samples: int = 0) -> plots.FitCurve:
    """The model's prediction (evaluation mode) over a dense x grid, and its MSE on both sets;
    with mc_samples, also the MC-dropout mean and standard deviation over the grid."""
    model.eval()
    device = data.train.inputs.device
    xs = torch.linspace(-1.0, 1.0, 200, device=device).unsqueeze(1)
    train_mse = torch.mean((model(data.train.inputs) - data.train.targets) ** 2).item()
    test_mse = torch.mean((model(data.test.inputs) - data.test.targets) ** 2).item()
    curve = plots.FitCurve(label, xs.squeeze(1).tolist(), model(xs).squeeze(1).tolist(), train_mse, test_mse)
    if mc_samples:
        # One thinned network per pass: each sample is a whole function of x, so the band is
        # smooth rather than 200 independent estimates side by side.
        mean, std = mc_forward(model, xs, mc_samples, one_draw_per_batch=True)
        curve.mc_mean, curve.mc_std = mean.squeeze(1).tolist(), std.squeeze(1).tolist()
        curve.mc_samples = mc_samples
    return curve


def calibration_values(
    model: torch.nn.Module, data: Dataset, outcome: Outcome, batch_size: int
) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, float]]:
    """Reliability bins and predictive entropies on the test set, deterministic vs MC dropout
    (what plots.calibration draws), and the two expected calibration errors."""
    mc_name = f"MC dropout (T={outcome.test_mc.samples})"
    named = {"deterministic": predictions(model, data, data.test, batch_size), mc_name: outcome.test_mc}
    bins = {name: calibration(p.mean, p.targets) for name, p in named.items()}
    entropies = {name: predictive_entropy(p.mean).cpu().tolist() for name, p in named.items()}
    return bins, entropies, {"test/ece": bins["deterministic"].ece, "test_mc/ece": bins[mc_name].ece}


def _points(split) -> tuple[list[float], list[float]]:
    return split.inputs.squeeze(1).tolist(), split.targets.squeeze(1).tolist()


def train_run(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    *,
    group: str | None = None,
    job_type: str | None = None,
    extra_tags: tuple[str, ...] = (),
    resume: bool = False,
    starts_from: Path | None = None,
) -> RunResult:
    """Train one model into run_dir (or, with resume, continue the one there from its
    checkpoint; `starts_from`: the run a rerun reproduces, whose model W&B shows as its input). summary.json says `running` from the start and, whatever stops the run, how it
    ended (as long as the file system still takes a write)."""
    rd = RunDir(run_dir)
    if resume:  # a damaged record (RunDirError) refuses the resume before any record changes
        rd.read_metrics()
        rd.read_provenance()
    previous = read_summary_or_none(rd)
    # Before data loading: every run that ever started has a status. The W&B placement of a
    # resumed run is kept, since the resume reads it from here.
    rd.write_summary({"status": "running", "started": now_iso(), "pid": os.getpid(),
                      **({"wandb": previous["wandb"]} if previous and "wandb" in previous else {})})
    try:
        return _train_run(cfg, rd, overrides, group=group, job_type=job_type, extra_tags=extra_tags, resume=resume,
                          starts_from=starts_from)
    except BaseException as exc:
        if resume and isinstance(exc, RunDirError):
            # The run directory is left as it was: nothing was resumed.
            if previous is not None:
                write_json_atomic(rd.summary_path, previous, rd.path)
            else:
                rd.summary_path.unlink(missing_ok=True)
            raise
        current = read_summary_or_none(rd) or {}
        if current.get("status") == "running":  # not when the run concluded and only a later step failed
            reason = describe(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            try:
                rd.write_summary(
                    {
                        "status": "interrupted" if isinstance(exc, KeyboardInterrupt)
                        else "diverged" if isinstance(exc, NonFiniteLoss) else "failed",
                        "reason": reason,
                        "epoch": (rd.read_metrics() or [{"epoch": 0}])[-1].get("epoch", 0),
                        **({"wandb": current["wandb"]} if "wandb" in current else {}),
                    }
                )
            except OSError as summary_exc:  # the disk that stopped the run may refuse this too
                exc.add_note(f"summary.json still says running: {describe(summary_exc)}")
        raise


def read_summary_or_none(rd: RunDir) -> dict | None:
    try:
        return rd.read_summary()
    except (OSError, ValueError):
        return None


def _train_run(
    cfg: DictConfig,
    rd: RunDir,
    overrides: list[str],
    *,
    group: str | None,
    job_type: str | None,
    extra_tags: tuple[str, ...],
    resume: bool,
    starts_from: Path | None = None,
) -> RunResult:
    label = arm_label(cfg.model.dropout, cfg.model.dropout_kind)
    clock = time.perf_counter()
    state = rd.read_checkpoint(cfg) if resume else None
    device = set_up_process(cfg)
    fast = FastPaths.resolve(cfg.trainer, device)
    seed_everything(cfg.seed)
    log.info(f"[{label}] device: {describe_device(device)}; {fast.describe()}")
    data = load_dataset(cfg.data, device, log.info)
    log.info(f"[{label}] data: {data.describe()}" + (" (augmented: crop + flip)" if data.augment else ""))
    timings = {"data": time.perf_counter() - clock}

    clock = time.perf_counter()
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone, not on data loading
    model = fast.prepare_model(build_model(cfg.model).to(device))
    optimizer = make_optimizer(cfg.optim, model)
    dropout_sites = describe_sites(model)
    schedule = DropoutSchedule(cfg.model.dropout_schedule.kind,
                               cfg.model.dropout_schedule.epochs or cfg.trainer.epochs)
    log.info(f"[{label}] dropout sites ({schedule.describe()}): "
             + (", ".join(dropout_sites) or f"none (model.dropout_kind={cfg.model.dropout_kind})"))
    if state is not None:
        check_fits(rd.checkpoint_path, state, model)

    if state is None:
        provenance = collect_provenance(describe_device(device), overrides, data.describe(), data.fingerprint(), rd)
        rd.write_provenance(provenance)
    else:
        provenance = rd.read_provenance()
        if provenance.get("data_sha256") not in (None, data.fingerprint()):
            raise RunDirError(f"{rd.path / 'provenance.json'}: the data has changed since this run started "
                              "(data_sha256 differs), so it cannot be resumed exactly; start a new run.")
        resumes = [*provenance.get("resumed", []), {"at": now_iso(), "command": shlex.join(sys.orig_argv), "from_epoch": state["epoch"]}]
        rd.update_provenance(resumed=resumes)
        previous = rd.read_summary().get("wandb", {}) if rd.summary_path.is_file() else {}
        group, job_type = group or previous.get("group"), job_type or previous.get("job_type")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    group = group or cfg.tracker.group
    job_type = job_type or cfg.tracker.job_type or label
    tracker = make_run_tracker(
        cfg, rd, data, label, dropout_sites, provenance, group=group, job_type=job_type, extra_tags=extra_tags,
        resume_id=state.get("tracker_run_id") if state is not None else None, background=True,
    )
    declare_start(tracker, rd if state is not None else RunDir.existing(starts_from) if starts_from else None)
    backend = Single(model=model, optimizer=optimizer, data=data, cfg=cfg, schedule=schedule, fast=fast)
    member = MemberRun(rd, tracker, resolved, n_train=len(data.train), lr=optimizer.param_groups[0]["lr"])
    engine = Engine(backend, [member], cfg.trainer, label=label, histograms=cfg.tracker.watch,
                    log_freq=cfg.tracker.log_freq)
    if state is not None:
        engine.resume([state])
        log.info(f"[{label}] resuming {rd.path} after epoch {state['epoch']} of {cfg.trainer.epochs}")
    timings["setup"] = time.perf_counter() - clock

    result = RunResult(rd.path, label, "failed", None, timings=timings,
                       resumed_from=state["epoch"] if state is not None else None)
    started = time.time()
    try:
        (outcome,) = engine.run()
        timings.update(engine.timings)
        timings["wandb"] = getattr(tracker, "waited_s", 0.0)
        extra = {}
        if device.type == "cuda":
            extra["gpu_memory_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        conclude_run(cfg, rd, model, data, outcome, tracker, result, dropout_sites, group, job_type,
                     duration_s=time.time() - started, extra_summary=extra, timings=timings)
        log.info(f"[{label}] time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    except BaseException:
        result.outcome = None  # the run failed after training: W&B gets a non-zero exit code too
        raise
    finally:
        tracker.finish(exit_code=result.exit_code)
        timings["wandb"] = getattr(tracker, "waited_s", 0.0)
        result.tracker_url, result.sync_command = tracker.url, tracker.sync_command
        rd.close()
    return result


def make_run_tracker(
    cfg: DictConfig,
    rd: RunDir,
    data: Dataset,
    label: str,
    dropout_sites: list[str],
    provenance: dict[str, Any],
    *,
    group: str | None,
    job_type: str,
    extra_tags: tuple[str, ...],
    resume_id: str | None = None,
    shared_process: bool = False,
    background: bool = False,
):
    """The run's W&B run: named after experiment, arm and seed, in its study's or sweep's group,
    tagged, with the resolved config (flat) and the provenance as its config. `background`:
    started in a thread (a `BackgroundTracker`), unless tracking is disabled."""
    tags = [cfg.experiment, label, *cfg.tracker.tags, *extra_tags] + (["synthetic-data"] if data.synthetic else [])
    if background and resolve_mode(cfg.tracker.mode) != "disabled":
        return BackgroundTracker(lambda: make_run_tracker(
            cfg, rd, data, label, dropout_sites, provenance, group=group, job_type=job_type, extra_tags=extra_tags,
            resume_id=resume_id, shared_process=shared_process))
    tracker = make_tracker(
        cfg.tracker,
        run_dir=rd.path,
        group=group,
        job_type=job_type,
        tags=list(dict.fromkeys(tags)),
        name=f"{cfg.experiment}-{label}-seed{cfg.seed}",
        config={**flatten(OmegaConf.to_container(cfg, resolve=True)), "data.synthetic": data.synthetic,
                "model.dropout_sites": dropout_sites, **flatten({"provenance": provenance}),
                **flatten({"data": {"class_counts": data.class_counts()}})},
        resume_id=resume_id,
        shared_process=shared_process,
    )
    tracker.use_dataset(*dataset_artifact(cfg, data, provenance))
    return tracker


def dataset_artifact(cfg: DictConfig, data: Dataset, provenance: dict[str, Any]) -> tuple[str, dict[str, Any], str | None]:
    """The data a run trained on, as W&B's lineage names it: one artifact per data source, whose
    content (a description with the data's sha256, as provenance.json has it) changes with the
    data; data read from disk is referenced by a file:// URI, never copied."""
    parameters = OmegaConf.to_container(cfg.data, resolve=True)
    metadata = {"sha256": provenance.get("data_sha256") or data.fingerprint(), "source": data.describe(),
                "synthetic": data.synthetic, "parameters": parameters,
                "parameters_sha256": hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()}
    root = parameters.get("root")
    reference = Path(root).expanduser().resolve().as_uri() if root and not data.synthetic else None
    return f"{cfg.data.name}{'-synthetic' if data.synthetic else ''}-data", metadata, reference


def checkpoint_artifact(cfg: DictConfig, rd: RunDir, outcome: Outcome, tracker: Any) -> None:
    """The run's last checkpoint (the only one kept: checkpoints/last.pt) as its model artifact."""
    if rd.has_checkpoint():
        metadata = {"status": outcome.status, "epoch": outcome.epoch, "final": outcome.final,
                    "config": flatten(OmegaConf.to_container(cfg, resolve=True))}
        tracker.log_checkpoint(rd.checkpoint_path, metadata,
                               ["latest", "final" if outcome.status == "finished" else outcome.status])


def declare_start(tracker: Any, start: RunDir | None) -> None:
    """A resume or rerun names the model it starts from (the run's checkpoint, as that run's
    model artifact logged it) as its input, so W&B's lineage joins the two."""
    if start is None or not start.has_checkpoint():
        return
    run_id = ((read_summary_or_none(start) or {}).get("wandb") or {}).get("run_id")
    if run_id:
        tracker.use_model(f"model-{run_id}", start.checkpoint_path, {"run_dir": str(start.path)})


def draw_run_figures(
    cfg: DictConfig,
    rd: RunDir,
    model: torch.nn.Module,
    data: Dataset,
    outcome: Outcome,
    result: RunResult,
    drawer: plots.Drawer | None = None,
) -> tuple[dict[str, plots.Pending], dict[str, float]]:
    """Start a run's figures on `drawer` (inline without one): learning curves, the regression
    fit (its curve is computed here, into result.fit), calibration with MC dropout. Returns the
    figures' futures (each resolves to its PNG) and the calibration errors for the summary."""
    title = f"{cfg.experiment}, {result.label}, seed {cfg.seed}" + (" (SYNTHETIC data)" if data.synthetic else "")
    drawer = drawer or plots.Drawer()
    pending = {"learning_curves": drawer.submit(plots.learning_curves, outcome.rows,
                                                rd.plot_path("learning_curves.png"), title)}
    if data.task == "regression":
        result.fit = regression_fit_curve(model, data, result.label, cfg.eval.mc_samples)
        pending["regression_fit"] = drawer.submit(plots.regression_fit, _points(data.train), _points(data.test),
                                                  [result.fit], rd.plot_path("regression_fit.png"), title)
    calibration_errors: dict[str, float] = {}
    if outcome.test_mc is not None and data.task == "classification":
        bins, entropies, calibration_errors = calibration_values(model, data, outcome, cfg.trainer.eval_batch_size)
        pending["calibration"] = drawer.submit(plots.calibration, bins, entropies, rd.plot_path("calibration.png"),
                                               title)
    return pending, calibration_errors


def conclude_run(
    cfg: DictConfig,
    rd: RunDir,
    model: torch.nn.Module,
    data: Dataset,
    outcome: Outcome,
    tracker: Any,
    result: RunResult,
    dropout_sites: list[str],
    group: str | None,
    job_type: str,
    duration_s: float,
    extra_summary: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    figures: tuple[dict[str, plots.Pending], dict[str, float]] | None = None,
) -> None:
    """After training: the figures (also to W&B), summary.json and the W&B summary, for a trained
    `model` and how its training ended. `figures` are those `draw_run_figures` started (a
    vectorized sweep starts every member's before concluding any); None draws them here."""
    result.outcome, result.status = outcome, outcome.status
    clock = time.perf_counter()
    pending, calibration_errors = figures or draw_run_figures(cfg, rd, model, data, outcome, result)
    result.figures.update({name: future.result() for name, future in pending.items()})
    tracker.log_images({f"plots/{k}": v for k, v in result.figures.items()}, outcome.epoch, len(outcome.rows))
    if timings is not None:
        timings["figures"] = time.perf_counter() - clock
    summary = {
        "status": outcome.status,
        "reason": outcome.reason,
        "epoch": outcome.epoch,
        "epochs": cfg.trainer.epochs,
        # The resolution of every best/*_epoch: the best epoch is an evaluation epoch.
        "eval_every": cfg.trainer.eval_every,
        "experiment": cfg.experiment,
        "dropout": OmegaConf.to_container(cfg.model, resolve=True)["dropout"],
        "dropout_kind": cfg.model.dropout_kind,
        "dropout_sites": dropout_sites,
        "seed": cfg.seed,
        "synthetic_data": data.synthetic,
        "final": outcome.final,
        "best": outcome.best,
        "duration_s": round(duration_s, 3),
        **({} if timings is None else {
            # Where the time went: data loading, model and tracker set-up, training epochs,
            # evaluation, metric logging, checkpoints, the loop's bookkeeping, waiting for W&B's
            # start, figures (W&B's finish comes after this).
            "timings_s": {k: round(v, 3) for k, v in timings.items()}}),
        "wandb": {"run_id": tracker.run_id, "group": group, "job_type": job_type,
                  "url": tracker.url, "sync": tracker.sync_command},
        **(extra_summary or {}),
    }
    if result.fit is not None:
        summary["fit"] = {"train_mse": result.fit.train_mse, "test_mse": result.fit.test_mse}
    if calibration_errors:
        summary["calibration"] = calibration_errors
    if data.class_counts():  # regression data has no classes
        summary["class_counts"] = data.class_counts()
    tracker.set_summary({"status": outcome.status, **{f"best/{k}": v for k, v in outcome.best.items()}})
    checkpoint_artifact(cfg, rd, outcome, tracker)
    rd.write_summary(summary)
    rd.update_provenance(ended=now_iso())


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
    return "diverged" if all(s in ("finished", "diverged") for s in statuses) else "failed"


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
            _points(data.train), _points(data.test), fits, out.plot_path("regression_fit.png"), title, svg=True
        )
    return figures


def record_stopped_study(study_dir: Path, cfg: DictConfig, group: str, arms: list[StudyArm],
                         exc: BaseException) -> None:
    """study.json when the study stops on an exception (a full disk, a second Ctrl-C's
    KeyboardInterrupt outside training): failed or interrupted, why, and each arm as its own
    summary.json says; if the disk refuses this write too, the error says so."""
    from dropstudy.rundir import read_status

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
