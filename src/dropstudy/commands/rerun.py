"""`dropstudy rerun DIR`."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from dropstudy.commands.common import (
    ELSEWHERE_OUT,
    check_runnable,
    claimed,
    fail,
    handle_run_errors,
    load_saved_run,
    overridden,
    print_run,
)
from dropstudy.config.schema import process_uid
from dropstudy.tracking.console import stderr


def rerun(
    run_dir: Path = typer.Argument(..., metavar="DIR", help="The run, study (study.json) or sweep (sweep.json) "
                                   "directory to reproduce.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value changes to the saved config.",
                                                    show_default=False),
    rtol: float = typer.Option(1e-5, help="Relative tolerance for 'within tolerance'."),
    atol: float = typer.Option(1e-8, help="Absolute tolerance for 'within tolerance'."),
    out: Optional[Path] = typer.Option(None, help="Where the new run goes, a new or empty directory "
                                       "[default: `runs/<experiment>/<date>_<time>-rerun-<id>`]."),
) -> None:
    """Train again from a run's saved, resolved config into a new run directory, then compare
    every logged metric at every step with the original. Exit code 0 only when it reproduces.
    A study or a sweep reruns every finished run, one after another (a batched sweep's batches as
    the batches they were), into a subdirectory of the same name, with one verdict per run and
    one overall (rerun.json).

    Examples:

        dropstudy rerun runs/regression/2026-11-22_09-00-00-train-3f2a

        dropstudy rerun runs/regression/2026-11-22_09-00-00-train-3f2a model.dropout=0.3   # what changes?

        dropstudy rerun runs/regression/2026-11-22_09-00-00-study-3f2a
    """
    from datetime import datetime

    from rich.table import Table

    from dropstudy.runs.compare import MembersError, compare_metrics, environment_differences, likely_cause, members_of
    from dropstudy.store.rundir import RunDir, write_json_atomic
    from dropstudy.tracking.console import setup_logging

    overrides = list(overrides or [])
    try:
        members = members_of(run_dir) if run_dir.is_dir() else None
    except MembersError as exc:
        raise fail(str(exc))
    if members is not None:
        rerun_directory(run_dir, members, overrides, rtol, atol, out)
    cfg, saved_overrides = load_saved_run(run_dir)
    cfg = overridden(cfg, overrides)
    check_runnable(cfg)
    original = RunDir.existing(run_dir)
    check_original(run_dir)
    new_dir = out or Path("runs") / cfg.experiment / f"{datetime.now():%Y-%m-%d_%H-%M-%S}-rerun-{process_uid()}"
    with claimed(new_dir, ELSEWHERE_OUT):
        from dropstudy.runs.execute import train_run

        setup_logging(new_dir / "rerun.log")
        RunDir(new_dir).write_config(cfg, [*saved_overrides, *overrides])
        previous = original.read_summary().get("wandb", {}) if original.summary_path.is_file() else {}
        result = handle_run_errors(
            lambda: train_run(cfg, new_dir, [*saved_overrides, *overrides], group=previous.get("group"),
                              job_type="rerun", extra_tags=("rerun",), starts_from=run_dir)
        )
        print_run(result)
        comparison = compare_metrics(original.read_metrics(), RunDir(new_dir).read_metrics(), rtol, atol)
        env = environment_differences(original.read_provenance(), RunDir(new_dir).read_provenance())
        cause = likely_cause(comparison, overrides, env, bool(cfg.deterministic))

        table = Table(title=f"rerun of {run_dir}", title_justify="left")
        for column in ("metric", "steps", "max |abs diff|", "max rel diff"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for d in comparison.metrics:
            table.add_row(d.key, str(d.steps), f"{d.max_abs:.3g}", f"{d.max_rel:.3g}")
        stdout = Console()
        stdout.print(table)
        for item in env:
            stderr.print(f"[yellow]warning:[/] environment differs from the original: {item}", highlight=False)
        verdict = f"verdict: {comparison.verdict}"
        if comparison.first_difference:
            verdict += f"; first difference at {comparison.first_difference}"
        if cause:
            verdict += f"; likely cause: {cause}"
        typer.echo(verdict)
        write_json_atomic(
            new_dir / "rerun.json",
            {"original": str(run_dir), "overrides": overrides, "rtol": rtol, "atol": atol,
             "verdict": comparison.verdict, "first_difference": comparison.first_difference, "likely_cause": cause,
             "environment_differences": env, "metrics": [vars(d) for d in comparison.metrics]},
        )
        if result.exit_code != 0 and result.status == "interrupted":
            raise typer.Exit(result.exit_code)
        raise typer.Exit(0 if comparison.reproduces else 1)


def check_original(run_dir: Path) -> None:
    """A rerun compares with the original's complete rows and its provenance, and joins its W&B
    group: exit 2 when metrics.jsonl is missing, empty or damaged, or provenance.json or
    summary.json is; a half-written last line (a crash) is left out of the comparison, saying so."""
    from rich.markup import escape

    from dropstudy.store.rundir import RunDir, RunDirError

    run = RunDir.existing(run_dir)
    try:
        rows = run.read_metrics()
        run.read_provenance()
    except RunDirError as exc:
        raise fail(str(exc))
    if run.summary_path.is_file():  # the rerun joins the original's W&B group, read from it
        try:
            summary = run.read_summary()
        except (OSError, ValueError) as exc:
            raise fail(f"{run.summary_path}: not readable JSON ({exc}), so the run's record is damaged.")
        if not isinstance(summary, dict):
            raise fail(f"{run.summary_path}: not a run summary (a JSON object).")
    if not rows:
        raise fail(f"{run.metrics_path}: missing or empty; there is nothing to compare with.")
    if run.torn_tail():
        stderr.print(f"[yellow]warning:[/] {escape(run.torn_tail())}; it is left out of the comparison.",
                     highlight=False, soft_wrap=True)


def rerun_directory(directory: Path, runs: list[tuple[str, Path]], overrides: list[str], rtol: float, atol: float,
                    out: Optional[Path]) -> None:
    """`dropstudy rerun` of a study or sweep: every member's config is checked before anything is
    written, then `rerun.rerun_members` trains and compares them."""
    from datetime import datetime

    from dropstudy.runs.rerun import Member, MemberRerun, rerun_members
    from dropstudy.store.rundir import read_status
    from dropstudy.tracking.console import setup_logging

    members = []
    for name, original in runs:
        status = read_status(original)[0]
        if status != "finished":
            members.append(Member(name, original, status))
            continue
        cfg, saved_overrides = load_saved_run(original)
        cfg = overridden(cfg, overrides)
        check_runnable(cfg)
        check_original(original)
        members.append(Member(name, original, status, cfg, [*saved_overrides, *overrides]))
    todo = [m for m in members if m.cfg is not None]
    skipped = ", ".join(f"{m.name} ({m.status})" for m in members if m.cfg is None)
    if not todo:
        raise fail(f"{directory}: none of its runs finished ({skipped}); there is nothing to compare with.")
    new_dir = out or Path("runs") / todo[0].cfg.experiment / f"{datetime.now():%Y-%m-%d_%H-%M-%S}-rerun-{process_uid()}"

    def print_member(done: MemberRerun) -> None:
        print_run(done.result, indent="  ")
        line = f"  {done.member.name}: {done.comparison.verdict}"
        if done.comparison.first_difference:
            line += f"; first difference at {done.comparison.first_difference}"
        typer.echo(line)

    with ExitStack() as held:
        held.enter_context(claimed(new_dir, ELSEWHERE_OUT))
        for member in todo:
            held.enter_context(claimed(new_dir / member.name, ELSEWHERE_OUT, new=False))
        setup_logging(new_dir / "rerun.log")
        typer.echo(f"rerun of {directory}: {len(todo)} run(s) in this process, each as it first ran "
                   f"(alone, or with its batch as one batch) -> {new_dir}")
        if skipped:
            typer.echo(f"skipped, not finished in the original: {skipped}")
        done = handle_run_errors(lambda: rerun_members(directory, members, new_dir, overrides, rtol, atol,
                                                       on_member=print_member))
    for item in done.environment:
        stderr.print(f"[yellow]warning:[/] environment differs from the original: {item}", highlight=False)
    tally = {v: sum(m.comparison.verdict == v for m in done.done) for v in ("identical", "within tolerance", "differs")}
    counts = ", ".join(f"{n} {v}" for v, n in tally.items() if n)
    verdict = f"verdict: {done.verdict} ({counts} of {len(done.done)} runs)"
    first = done.first_differing
    if first is not None:
        verdict += f"; first difference in {first.member.name} at {first.comparison.first_difference}"
        if first.likely_cause:
            verdict += f"; likely cause: {first.likely_cause}"
    typer.echo(verdict)
    typer.echo(f"rerun dir: {new_dir}  (rerun.json)")
    if done.interrupted:
        typer.echo(f"interrupted: {len(done.done)} of {len(todo)} runs were rerun")
    raise typer.Exit(done.exit_code)
