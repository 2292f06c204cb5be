"""The one orchestrator: M >= 1 members, each a run with its own run directory, from composed
configs to finished run directories. `train`, `study`, `sweep`, `resume` and `rerun` all call
`train_members` (`train_run` is its one-member form).

It checks every record it will continue before writing anything, marks each member `running`,
loads the data once (members share it), builds the one backend (backend.py), gives each member
its provenance and W&B run, lets the `Engine` train them, draws each member's figures and writes
its summary; whatever stops the batch, each member's summary says how it ended and every W&B run
is finished. W&B starts in the background for a single run (`tracking.BackgroundTracker`), so its
start waits in line only where a call needs the run itself.
"""

from __future__ import annotations

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
from omegaconf import DictConfig, OmegaConf

from dropstudy.data.datasets import Dataset, load_dataset
from dropstudy.engine.backend import Backend
from dropstudy.engine.loop import Engine, MemberRun
from dropstudy.engine.outcome import NonFiniteLoss, Outcome
from dropstudy.engine.runtime import FastPaths, describe_device, set_up_process, usable_cpus
from dropstudy.model.dropout import DropoutSchedule, arm_label, describe_sites
from dropstudy.report import plots
from dropstudy.report.curves import calibration_values, regression_fit_curve, split_points
from dropstudy.store.failures import describe
from dropstudy.store.rundir import (
    ENDED,
    RunDir,
    RunDirError,
    check_fits,
    collect_provenance,
    now_iso,
    write_json_atomic,
)
from dropstudy.store.text import flatten
from dropstudy.tracking.tracker import NullTracker
from dropstudy.tracking.wandb_run import BackgroundTracker, make_tracker, resolve_mode

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








def read_summary_or_none(rd: RunDir) -> dict | None:
    try:
        return rd.read_summary()
    except (OSError, ValueError):
        return None


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
    drawer: plots.Drawer,
) -> tuple[dict[str, plots.Pending], dict[str, float]]:
    """Start a run's figures on `drawer`: learning curves, the regression
    fit (its curve is computed here, into result.fit), calibration with MC dropout. Returns the
    figures' futures (each resolves to its PNG) and the calibration errors for the summary."""
    title = f"{cfg.experiment}, {result.label}, seed {cfg.seed}" + (" (SYNTHETIC data)" if data.synthetic else "")
    pending = {"learning_curves": drawer.submit(plots.learning_curves, outcome.rows,
                                                rd.plot_path("learning_curves.png"), title)}
    if data.task == "regression":
        result.fit = regression_fit_curve(model, data, result.label, cfg.eval.mc_samples)
        pending["regression_fit"] = drawer.submit(plots.regression_fit, split_points(data.train), split_points(data.test),
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
    data: Dataset,
    outcome: Outcome,
    tracker: Any,
    result: RunResult,
    dropout_sites: list[str],
    group: str | None,
    job_type: str,
    duration_s: float,
    *,
    timings: dict[str, float],
    figures: tuple[dict[str, plots.Pending], dict[str, float]],
    figures_started: float,
    extra_summary: dict[str, Any] | None = None,
) -> None:
    """After training: the figures (also to W&B), summary.json and the W&B summary, for a trained
    run and how its training ended. `figures` are those `draw_run_figures` started at
    `figures_started` (`time.perf_counter()`; a batch starts every member's before concluding
    any)."""
    result.outcome, result.status = outcome, outcome.status
    pending, calibration_errors = figures
    result.figures.update({name: future.result() for name, future in pending.items()})
    tracker.log_images({f"plots/{k}": v for k, v in result.figures.items()}, outcome.epoch, len(outcome.rows))
    timings["figures"] = time.perf_counter() - figures_started
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
        # Where the time went: data loading, model and tracker set-up, training epochs,
        # evaluation, metric logging, checkpoints, the loop's bookkeeping, waiting for W&B's
        # start, figures (W&B's finish comes after this).
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "wandb": {"run_id": tracker.run_id, "group": group, "job_type": job_type,
                  "url": tracker.url, "sync": tracker.sync_command},
        **(extra_summary or {}),
    }
    if result.fit is not None:
        summary["fit"] = {"train_mse": result.fit.train_mse, "test_mse": result.fit.test_mse}
    if calibration_errors:
        summary["calibration"] = calibration_errors
    class_counts = data.class_counts()
    if class_counts:  # regression data has no classes
        summary["class_counts"] = class_counts
    tracker.set_summary({"status": outcome.status, **{f"best/{k}": v for k, v in outcome.best.items()}})
    checkpoint_artifact(cfg, rd, outcome, tracker)
    rd.write_summary(summary)
    rd.update_provenance(ended=now_iso())


# --------------------------------------------------------------------------- the orchestrator


@dataclass
class Member:
    cfg: DictConfig  # the member's fully composed + validated config
    run_dir: Path  # its own run directory (every file a single run writes)
    overrides: list[str]  # the member's own Hydra overrides (saved to .hydra/overrides.yaml)


@dataclass
class Batch:
    """How the members of one `train_members` call belong together."""

    group: str | None = None  # their W&B group (None: tracker.group, or a resumed run's own)
    job_type: str | None = None  # None: each member's tracker.job_type, else its arm label
    extra_tags: tuple[str, ...] = ()
    sweep: tuple[int, Path] | None = None  # (batch number, sweep dir): recorded for resuming the sweep
    starts_from: Path | None = None  # the run a rerun reproduces, whose model W&B shows as its input


@dataclass
class MemberRecord:
    """What the orchestrator keeps of one member while its batch trains."""

    member: Member
    rd: RunDir
    label: str
    state: dict[str, Any] | None  # the checkpoint it continues from
    previous: dict[str, Any] | None  # its summary.json before this call
    trained: bool = True  # False: set aside before a resume (diverged, finished); its record stays as it is
    run: MemberRun | None = None
    result: RunResult | None = None
    dropout_sites: list[str] = field(default_factory=list)
    group: str | None = None
    job_type: str = ""


def train_run(cfg: DictConfig, run_dir: Path, overrides: list[str], *, group: str | None = None,
              job_type: str | None = None, extra_tags: tuple[str, ...] = (), resume: bool = False,
              starts_from: Path | None = None) -> RunResult:
    """Train one model into run_dir (or, with resume, continue the one there from its checkpoint)."""
    batch = Batch(group=group, job_type=job_type, extra_tags=extra_tags, starts_from=starts_from)
    return train_members([Member(cfg, run_dir, overrides)], batch, resume=resume)[0]


def train_members(members: list[Member], batch: Batch | None = None, *, resume: bool = False) -> list[RunResult]:
    """Train the members as one batch (one process, one copy of the data, the one backend); each
    gets its own complete run directory and W&B run. With `resume` each continues from its
    checkpoint (one epoch boundary for all), and a member that diverged or finished before trains
    along off the record, so the others draw what they would have drawn. RunDirError (nothing
    written) when a record cannot be used."""
    batch = batch or Batch()
    records = preflight(members, resume)
    for rec in records:
        if rec.trained:
            # Before data loading: every run that ever started has a status. The W&B placement of a
            # resumed run is kept, since the resume reads it from here.
            keep = {"wandb": rec.previous["wandb"]} if rec.previous and "wandb" in rec.previous else {}
            rec.rd.write_summary({"status": "running", "started": now_iso(), "pid": os.getpid(), **keep})
    try:
        return _train(records, batch, resume)
    except BaseException as exc:
        record_failure(records, exc, resume)
        raise
    finally:
        for rec in records:
            if rec.run is not None:
                rec.run.tracker.finish(exit_code=rec.result.exit_code)
                rec.result.timings["wandb"] = getattr(rec.run.tracker, "waited_s", 0.0)
                rec.result.tracker_url, rec.result.sync_command = rec.run.tracker.url, rec.run.tracker.sync_command
            rec.rd.close()


def preflight(members: list[Member], resume: bool) -> list[MemberRecord]:
    """Every member's record, read and checked before anything is written: a new run's directory
    must not hold a run; a resumed one's metrics, provenance and checkpoint must be whole and of
    one epoch boundary for all."""
    records = []
    for member in members:
        rd = RunDir(member.run_dir)
        label = arm_label(member.cfg.model.dropout, member.cfg.model.dropout_kind)
        previous = read_summary_or_none(rd)
        if not resume:
            if len(members) > 1 and RunDir.existing(member.run_dir).holds_rows():
                raise RunDirError(f"{member.run_dir} already holds a run; a batch starts new runs only "
                                  "(continue that one with `dropstudy resume`)")
            records.append(MemberRecord(member, rd, label, None, previous))
            continue
        rd.read_metrics()  # a damaged record refuses the resume before any record changes
        rd.read_provenance()
        set_aside = len(members) > 1 and (previous or {}).get("status") in ENDED
        state = None if set_aside else rd.read_checkpoint(member.cfg)
        records.append(MemberRecord(member, rd, label, state, previous, trained=not set_aside))
    live = [rec.state for rec in records if rec.state is not None]
    if resume and not live:
        raise RunDirError(f"{members[0].run_dir.parent}: every member of this batch finished or diverged; "
                          "nothing to resume.")
    if len({s["epoch"] for s in live}) > 1:
        raise RunDirError(f"{members[0].run_dir.parent}: the members' checkpoints are of different epochs "
                          f"({sorted({s['epoch'] for s in live})}); they cannot continue as one batch.")
    if any("ensemble" in s for s in live):
        raise RunDirError(f"{records[0].rd.checkpoint_path}: written by an earlier dropstudy whose batched members "
                          "drew their dropout masks from one shared stream; it cannot continue exactly. "
                          "Start the sweep again.")
    if len({s.get("execution", "sequential") for s in live}) > 1:
        raise RunDirError(f"{members[0].run_dir.parent}: the members' checkpoints were trained with different "
                          "sweep.member_execution; they cannot continue as one batch.")
    return records


def record_failure(records: list[MemberRecord], exc: BaseException, resume: bool) -> None:
    """Each member that did not conclude says in its summary.json how the batch stopped; a resume
    refused for a damaged record (RunDirError) leaves every record as it was."""
    for rec in records:
        if not rec.trained or (rec.result is not None and rec.result.outcome is not None):
            continue  # set aside, or concluded already (only a later step failed)
        if resume and isinstance(exc, RunDirError):
            if rec.previous is not None:
                write_json_atomic(rec.rd.summary_path, rec.previous, rec.rd.path)
            else:
                rec.rd.summary_path.unlink(missing_ok=True)
            continue
        run = rec.run
        # Each member names its own file that could not be written; one whose write went through
        # stopped with the batch, for the reason the batch stopped.
        if run is not None and run.write_error is not None:
            reason = describe(run.write_error)
        elif isinstance(exc, OSError):
            reason = describe(exc) if len(records) == 1 else f"stopped with its batch: {describe(exc)}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        current = read_summary_or_none(rec.rd) or {}
        try:
            rec.rd.write_summary({
                "status": "interrupted" if isinstance(exc, KeyboardInterrupt)
                else "diverged" if isinstance(exc, NonFiniteLoss) else "failed",
                "reason": reason,
                "epoch": run.outcome.epoch if run is not None else rec.state["epoch"] if rec.state else 0,
                **({"wandb": current["wandb"]} if "wandb" in current else {}),
            })
        except OSError as summary_exc:  # the disk that stopped the batch may refuse this too
            exc.add_note(f"{rec.rd.summary_path} still says running: {describe(summary_exc)}")


def load_member_data(members: list[Member], device: torch.device) -> list[Dataset]:
    """Each member's dataset: one object per distinct `data` config, all rows of one copy of the
    images (members that differ only in data.seed share it)."""
    shared: dict[Any, Any] = {}
    by_config: dict[str, Dataset] = {}
    datas = []
    for i, member in enumerate(members):
        key = json.dumps(OmegaConf.to_container(member.cfg.data, resolve=True), sort_keys=True)
        if key not in by_config:
            by_config[key] = load_dataset(member.cfg.data, device, log.info if i == 0 else log.debug, shared)
        datas.append(by_config[key])
    return datas


def _train(records: list[MemberRecord], batch: Batch, resume: bool) -> list[RunResult]:
    members = [rec.member for rec in records]
    cfg0, single = members[0].cfg, len(members) == 1
    name = f"[{records[0].label}]" if single else f"[{len(members)} members]"
    clock = time.perf_counter()
    device = set_up_process(cfg0)  # trainer.*, device and deterministic are the same for every member
    fast = FastPaths.resolve(cfg0.trainer, device)
    log.info(f"{name} device: {describe_device(device)}; {fast.describe()}")
    datas = load_member_data(members, device)
    log.info(f"{name} data: {datas[0].describe()}" + (" (augmented: crop + flip)" if datas[0].augment else "")
             + ("" if single or all(d is datas[0] for d in datas) else f"; {len(set(map(id, datas)))} data.seed splits"))
    # Where the whole batch's time went, the same for every member (summary.json timings_s).
    timings = {"data": time.perf_counter() - clock}
    clock = time.perf_counter()
    live = [rec.state for rec in records if rec.state is not None]
    execution = live[0].get("execution", "sequential") if live else None
    backend = Backend([m.cfg for m in members], datas, fast, execution)
    if not single:
        log.info(f"{name} one batch ({backend.describe()}) on {describe_device(device)}")
    for i, (rec, data) in enumerate(zip(records, datas)):
        model, cfg, rd, state = backend.models[i], rec.member.cfg, rec.rd, rec.state
        rec.dropout_sites = describe_sites(model)
        if single:
            schedule = DropoutSchedule(cfg.model.dropout_schedule.kind, cfg.model.dropout_schedule.epochs or cfg.trainer.epochs)
            log.info(f"{name} dropout sites ({schedule.describe()}): "
                     + (", ".join(rec.dropout_sites) or f"none (model.dropout_kind={cfg.model.dropout_kind})"))
        if state is not None:
            check_fits(rd.checkpoint_path, state, model)  # stacked: the member's module, its shapes
        provenance = member_provenance(rec, data, device, backend, batch, i, members, resume)
        previous_wandb = (rec.previous or {}).get("wandb", {}) if resume else {}
        rec.group = batch.group or previous_wandb.get("group") or cfg.tracker.group
        rec.job_type = batch.job_type or previous_wandb.get("job_type") or cfg.tracker.job_type or rec.label
        tracker = NullTracker() if not rec.trained else make_run_tracker(
            cfg, rd, data, rec.label, rec.dropout_sites, provenance, group=rec.group, job_type=rec.job_type,
            extra_tags=batch.extra_tags, resume_id=state.get("tracker_run_id") if state else None,
            shared_process=not single, background=single)
        if rec.trained:
            declare_start(tracker, rd if state is not None else RunDir.existing(batch.starts_from)
                          if batch.starts_from else None)
        rec.run = MemberRun(rd, tracker, OmegaConf.to_container(cfg, resolve=True), n_train=len(data.train),
                            lr=float(cfg.optim.lr))
        rec.result = RunResult(rd.path, rec.label, "failed", None, timings=timings if single else {},
                               resumed_from=state["epoch"] if state else None)
    engine = Engine(backend, [rec.run for rec in records], cfg0.trainer, label=name.strip("[]"),
                    histograms=cfg0.tracker.watch, log_freq=cfg0.tracker.log_freq)
    if resume:
        engine.resume([rec.state for rec in records])
        log.info(f"{name} resuming after epoch {live[0]['epoch']} of {cfg0.trainer.epochs}"
                 + (f": {records[0].rd.path}" if single else ""))
    timings["setup"] = time.perf_counter() - clock

    started = time.time()
    outcomes = engine.run()  # each member's, concluded (final and best values)
    duration = time.time() - started
    timings.update(engine.timings)
    timings["wandb"] = max(getattr(rec.run.tracker, "waited_s", 0.0) for rec in records)
    extra: dict[str, Any] = {} if single else {"batch": {"members": len(records)}}
    if device.type == "cuda":
        extra["gpu_memory_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    concluding = [i for i, rec in enumerate(records) if rec.trained]
    # Every member's figures are started before any member concludes, so that they draw side by
    # side on worker processes (one per CPU) while this process logs and writes summaries.
    figures_started = time.perf_counter()  # drawn inline for one member: the time is in starting them
    with plots.Drawer(figure_workers(len(concluding))) as drawer:
        started_figures = [draw_run_figures(records[i].member.cfg, records[i].rd, backend.member_model(i), datas[i],
                                            outcomes[i], records[i].result, drawer)
                           for i in concluding]
        for i, figures in zip(concluding, started_figures):
            rec = records[i]
            member_extra = extra if single else {**extra, "batch": {"members": len(records), "index": i}}
            conclude_run(rec.member.cfg, rec.rd, datas[i], outcomes[i],
                         rec.run.tracker, rec.result, rec.dropout_sites, rec.group, rec.job_type,
                         duration_s=duration, extra_summary=member_extra,
                         timings=timings if single else dict(timings),  # a batch's own, shared
                         figures=figures, figures_started=figures_started)
    if single:
        log.info(f"{name} time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    for rec in records:
        if not rec.trained:  # set aside before this resume: its summary stands
            rec.result.outcome = rec.run.outcome
            rec.result.status = rec.rd.read_status()[0]
    return [rec.result for rec in records]


def member_provenance(rec: MemberRecord, data: Dataset, device: torch.device, backend: Backend, batch: Batch,
                      index: int, members: list[Member], resume: bool) -> dict[str, Any]:
    """A new member's provenance.json, written; or a resumed one's, read, with this resume added
    (RunDirError when the data changed since it started: it could not continue exactly)."""
    rd, state = rec.rd, rec.state
    if not resume:
        provenance = collect_provenance(describe_device(device), rec.member.overrides, data.describe(),
                                        data.fingerprint(), rd)
        if len(members) > 1 or batch.sweep is not None:  # a sweep's last batch may hold one member
            provenance["batch"] = {"members": len(members), "index": index, "execution": backend.execution,
                                   "shared_stream": bool(backend.shared_state()), "group": batch.group}
            if batch.sweep is not None:
                provenance["batch"].update(number=batch.sweep[0], run_dirs=[os.path.relpath(m.run_dir, batch.sweep[1])
                                                                            for m in members])
        rd.write_provenance(provenance)
        return provenance
    provenance = rd.read_provenance()
    if state is not None:
        if provenance.get("data_sha256") not in (None, data.fingerprint()):
            raise RunDirError(f"{rd.path / 'provenance.json'}: the data has changed since this run started "
                              "(data_sha256 differs), so it cannot be resumed exactly; start a new run.")
        resumes = [*provenance.get("resumed", []), {"at": now_iso(), "command": shlex.join(sys.orig_argv),
                                                    "from_epoch": state["epoch"]}]
        rd.update_provenance(resumed=resumes)
    return provenance


def figure_workers(members: int) -> int:
    """Processes for the members' figures: one per usable CPU (at most 16), none for a few
    members, where starting the workers (an import of matplotlib each) costs more than it saves."""
    if members < 8:
        return 1
    return max(1, min(usable_cpus(), 16, members))
