"""`dropstudy resume DIR`: a run, a study or a sweep."""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import typer
from omegaconf import OmegaConf

from dropstudy.commands.common import (
    ELSEWHERE_RUN,
    ELSEWHERE_SWEEP,
    EXIT_INTERRUPTED,
    check_runnable,
    claimed,
    fail,
    handle_run_errors,
    load_saved_run,
    print_run,
    print_sweep_table,
)
from dropstudy.store.text import shell_command
from dropstudy.tracking.console import stderr


def resume(
    directory: Path = typer.Argument(..., metavar="DIR", help="A run (one with checkpoints/last.pt), a study "
                                     "(study.json) or a sweep (sweep.json) directory; a batched sweep continues as the batches it was.", show_default=False),
) -> None:
    """Continue what was interrupted, in the same directories and the same W&B runs; finished runs
    are kept. A run continues from its last checkpoint and ends with exactly the metrics of an
    uninterrupted run (on CPU). A study or a sweep resumes each unfinished run from its checkpoint
    and starts those that never started, one after another in this process, then redraws the
    study's comparison (study.json) or prints the sweep's table again (sweep.json). Resuming one
    arm of a study also updates the study's record and figures.

    Examples:

        dropstudy resume runs/cifar10/2026-11-22_09-00-00-train-3f2a

        dropstudy resume runs/regression/2026-11-22_09-00-00-study-3f2a

        dropstudy resume runs/regression/2026-11-22_09-00-00-study-3f2a/dropout-0.5

        dropstudy resume runs/regression/2026-11-22_09-00-00-sweep-3f2a
    """
    if not directory.exists():
        raise fail(f"{directory}: no such directory.")
    if not directory.is_dir():
        raise fail(f"{directory}: not a directory; give a run, study or sweep directory.")
    from dropstudy.runs.resume import directory_kind

    {"sweep": resume_sweep_dir, "study": resume_study_dir, "run": resume_run_dir}[directory_kind(directory)](directory)


class ResumeLog:
    """resume.log in `directory`, taken back if the run refuses the resume once it is under way
    (an unreadable checkpoint, one that does not fit, changed data): a refused resume leaves the
    directory as it was."""

    def __init__(self, directory: Path):
        from dropstudy.tracking.console import setup_logging

        self.path = directory / "resume.log"
        self.size = self.path.stat().st_size if self.path.is_file() else None
        setup_logging(self.path)

    def take_back(self) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):  # removed too: a closed one reopens to log
                root.removeHandler(handler)
                handler.close()
        if self.size is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            os.truncate(self.path, self.size)


def resume_run_dir(run_dir: Path) -> None:
    from dropstudy.runs.execute import train_run
    from dropstudy.store.rundir import RunDir, RunDirError
    from dropstudy.sweeps.batches import sweep_of_member

    try:
        sweep_dir = sweep_of_member(run_dir)
    except RunDirError as exc:
        raise fail(str(exc))
    if sweep_dir is not None:
        raise fail(f"{run_dir} is a member of a batched sweep, whose members continue together; "
                   f"resume the sweep: {shell_command('dropstudy', 'resume', sweep_dir)}")
    cfg, saved_overrides = load_saved_run(run_dir)
    with claimed(run_dir, ELSEWHERE_RUN, new=False):
        run = RunDir.existing(run_dir)
        if run.read_status()[0] == "finished":
            raise fail(f"{run_dir} finished already (summary.json); there is nothing to resume. "
                       f"To train it again use: {shell_command('dropstudy', 'rerun', run_dir)}")
        check_runnable(cfg)
        try:  # read before anything is written: a damaged file refuses the resume
            run.read_metrics()
            run.read_provenance()
        except RunDirError as exc:
            raise fail(str(exc))
        if run.torn_tail() and run.has_checkpoint():
            from rich.markup import escape

            stderr.print(f"[yellow]warning:[/] {escape(run.torn_tail())}; it is dropped, as are all rows after "
                         "the checkpoint, which are trained again.", highlight=False, soft_wrap=True)
        resume_log = handle_run_errors(lambda: ResumeLog(run_dir))
        try:
            result = handle_run_errors(lambda: train_run(cfg, run_dir, saved_overrides, resume=True))
        except RunDirError as exc:
            resume_log.take_back()
            raise fail(str(exc))
    print_run(result)
    update_study_of_arm(result)
    raise typer.Exit(result.exit_code)


def update_study_of_arm(result: Any) -> None:
    """An arm resumed by hand: its study's record and comparison, when its parent is a study."""
    from dropstudy.runs.resume import ResumeError, update_study

    study_dir = result.run_dir.parent
    try:
        updated = update_study(study_dir, result)
    except ResumeError as exc:
        from rich.markup import escape

        stderr.print(f"[yellow]warning:[/] the study's record was not updated: {escape(str(exc))}", highlight=False)
        return
    if updated is not None:
        figures, status = updated
        typer.echo(f"study {study_dir}: {status} (study.json rewritten)")
        for path in figures.values():
            typer.echo(f"comparison figure: {path}")


def resume_study_dir(study_dir: Path) -> None:
    from dropstudy.runs.resume import ResumeError, plan_study_resume, resume_study
    from dropstudy.store.rundir import RunDirError, read_status

    try:
        plan = plan_study_resume(study_dir)
    except (ResumeError, RunDirError) as exc:
        raise fail(str(exc))
    for step in plan.steps:
        if step.action != "keep":
            check_runnable(step.cfg)
    # The study dir and the arms still to train stay locked until this command is done with them;
    # finished arms are only read.
    with ExitStack() as held:
        held.enter_context(claimed(study_dir, ELSEWHERE_RUN, new=False))
        for step in plan.steps:
            if step.action != "keep":
                held.enter_context(claimed(step.run_dir, ELSEWHERE_RUN, new=False))
        handle_run_errors(lambda: ResumeLog(study_dir))
        todo = [s for s in plan.steps if s.action != "keep"]
        typer.echo(f"study dir: {study_dir}  (W&B group {plan.group})")
        for step in plan.steps:
            typer.echo(f"  {step.describe()}")
        if todo:
            typer.echo(f"training {len(todo)} arm(s) one after another in this process")
        result = handle_run_errors(lambda: resume_study(plan))
    for step in result.steps:
        if step.result is not None:
            print_run(step.result, indent="  ")
        else:
            typer.echo(f"  run dir: {step.run_dir}  [{read_status(step.run_dir)[0]}]")
    for path in result.figures.values():
        typer.echo(f"comparison figure: {path}")
    typer.echo(f"study status: {result.status} (study.json rewritten)")
    raise typer.Exit(0 if result.status == "finished" else EXIT_INTERRUPTED if result.interrupted else 1)


def resume_sweep_dir(sweep_dir: Path) -> None:
    from dropstudy.store.rundir import RunDirError, now_iso
    from dropstudy.sweeps.batches import sweep_batches

    try:
        batches = sweep_batches(sweep_dir)
    except RunDirError as exc:
        raise fail(str(exc))
    # The batches first, then the jobs no batch reached, below; `continued`: run dir -> epoch.
    continued = resume_sweep_batches(sweep_dir, batches) if batches else {}

    from dropstudy.runs.resume import ResumeError
    from dropstudy.sweeps.plan import setting
    from dropstudy.sweeps.resume import plan_sweep_resume, resume_sweep
    from dropstudy.sweeps.run import collect_outcomes, write_sweep_json

    try:
        resumption = plan_sweep_resume(sweep_dir)
    except (ResumeError, RunDirError) as exc:
        raise fail(str(exc))
    plan, todo = resumption.plan, [s for s in resumption.steps if s.action != "keep"]
    seen_data: set[str] = set()
    for step in todo:  # device and data once per distinct setting
        key = json.dumps([step.cfg.device, OmegaConf.to_container(step.cfg.data)], sort_keys=True, default=str)
        if key not in seen_data:
            seen_data.add(key)
            check_runnable(step.cfg)
    sweep_lock = claimed(sweep_dir, ELSEWHERE_SWEEP, new=False)  # released after the table below
    handle_run_errors(lambda: ResumeLog(sweep_dir))
    from_epoch = {job.num: continued[job.run_dir.resolve()] for job in plan.jobs if job.run_dir.resolve() in continued}
    stderr.print(f"sweep: {len(plan.jobs)} jobs, " + (f"{len(from_epoch)} continued from checkpoints (batched), "
                 if from_epoch else "") + f"{len(plan.jobs) - len(todo) - len(from_epoch)} kept -> {plan.sweep_dir}  "
                 f"W&B group {plan.group}", highlight=False)
    varying = set(plan.varying)
    for job in plan.jobs:
        if job.num in from_epoch:
            stderr.print(f"  member {job.num} ({setting(job.overrides, varying)}): interrupted, "
                         f"resumed after epoch {from_epoch[job.num]}",
                         highlight=False, soft_wrap=True)
    for step in todo:
        stderr.print(f"  {step.describe()}", highlight=False, soft_wrap=True)
    if todo:
        was = "" if resumption.mode == "basic" else f"; the sweep first ran {resumption.mode}"
        stderr.print(f"running {len(todo)} job(s) one after another in this process (basic launcher{was})",
                     highlight=False, soft_wrap=True)
    resume_sweep(resumption)
    outcomes = collect_outcomes(plan)
    print_sweep_table(f"sweep {plan.sweep_dir} (W&B group {plan.group})", outcomes)
    resumes = [*resumption.record.get("resumed", []),
               {"at": now_iso(),
                "jobs": [job.num for job, s in zip(plan.jobs, resumption.steps) if s.action != "keep"],
                "continued": [{"num": num, "from_epoch": epoch} for num, epoch in from_epoch.items()],
                "interrupted": resumption.interrupted}]
    summary = write_sweep_json(plan, outcomes, resumption.interrupted, resumption.mode, {"resumed": resumes})
    sweep_lock.release()
    typer.echo(f"sweep dir: {plan.sweep_dir}  table: {summary}")
    bad = [o for o in outcomes if not o.ok]
    if resumption.interrupted:
        raise fail(f"interrupted: {len(outcomes) - len(bad)} of {len(outcomes)} jobs finished; "
                   f"continue with: {shell_command('dropstudy', 'resume', sweep_dir)}", EXIT_INTERRUPTED)
    if bad:
        names = "; ".join(f"#{o.num} ({o.setting or ' '.join(o.overrides)}) {o.status}"
                          + (f": {o.reason}" if o.reason else "") for o in bad)
        raise fail(f"{len(bad)} of {len(outcomes)} sweep jobs did not finish: {names}", 1)


def resume_sweep_batches(sweep_dir: Path, batches: list[list[Path]]) -> dict[Path, int]:
    """The batched part of `dropstudy resume SWEEP_DIR`: batches of a sweep that were interrupted
    continue as the batches they were. Exits when they are interrupted again; returns the epoch
    each member continued from, by its resolved run dir."""
    from dropstudy.store.rundir import ENDED, RunDirError, read_status
    from dropstudy.sweeps.batches import resume_sweep

    if all(read_status(d)[0] in ENDED for batch in batches for d in batch):
        return {}
    check_runnable(load_saved_run(batches[0][0])[0])
    stderr.print(f"continuing {len(batches)} batch(es) of {sweep_dir}", highlight=False)
    with claimed(sweep_dir, ELSEWHERE_SWEEP, new=False):
        resume_log = handle_run_errors(lambda: ResumeLog(sweep_dir))
        try:
            results = handle_run_errors(lambda: resume_sweep(batches))
        except RunDirError as exc:
            resume_log.take_back()
            raise fail(str(exc))
    for result in results:
        typer.echo(f"  run dir: {result.run_dir}  [{result.status}]")
    stopped = [r for r in results if r.status == "interrupted"]
    if stopped:
        typer.echo(f"to continue every member from its last checkpoint: {shell_command('dropstudy', 'resume', sweep_dir)}")
        raise typer.Exit(stopped[0].exit_code)
    return {r.run_dir.resolve(): r.resumed_from for r in results if r.resumed_from is not None}
