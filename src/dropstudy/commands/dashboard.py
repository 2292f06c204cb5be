"""`dropstudy dashboard DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

from dropstudy.commands.common import fail, handle_run_errors


def dashboard(
    directory: Path = typer.Argument(..., metavar="DIR", help="A study (study.json), sweep (sweep.json) or "
                                     "reported (report/report.csv) directory whose runs were tracked by W&B.",
                                     show_default=False),
) -> None:
    """Save the W&B view of a study or sweep, and the W&B Report of a `dropstudy report`, on the W&B
    server: the runs of the directory's W&B group, grouped by dropout rate (and kind or site where
    they vary), one colour per rate as in dropstudy's figures, with sections for loss (train in
    training mode, train in eval mode, val), the generalisation gap, accuracy, dropout rates and
    weight norms, gradient and parameter histograms, and the figures. The report adds the table of
    report.csv, the commands and the provenance. The specification is also written to
    DIR/wandb_view.json.

    `study`, `sweep` and `report` save it themselves when their runs are online; for offline runs,
    upload them with `wandb sync` first, then run this. Needs W&B credentials (`wandb login` or
    WANDB_API_KEY); exit code 1 when the server cannot save it.

    Examples:

        dropstudy dashboard runs/regression/2026-11-22_09-00-00-study-3f2a

        dropstudy dashboard runs/regression/2026-11-22_09-00-00-sweep-3f2a
    """
    if not directory.is_dir():
        raise fail(f"{directory}: no such directory; give a study, sweep or reported directory.")
    from dropstudy.report.dashboard import DashboardError, publish, view_spec, write_spec
    from dropstudy.tracking.tracker import first_line
    from dropstudy.tracking.wandb_run import has_wandb_credentials

    try:
        spec = view_spec(directory)
    except DashboardError as exc:
        raise fail(str(exc))
    if not has_wandb_credentials():
        raise fail("no W&B credentials: run `wandb login` or set WANDB_API_KEY, then run this again.")
    path = handle_run_errors(lambda: write_spec(directory, spec))
    typer.echo(f"W&B view specification: {path}")
    try:
        urls = publish(spec)
    except Exception as exc:
        raise fail(f"W&B could not save the view ({type(exc).__name__}: {first_line(exc)}).", 1)
    for url in urls:
        typer.echo(f"W&B: {url}")
