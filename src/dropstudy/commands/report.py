"""`dropstudy report DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.console import Console

from dropstudy.commands.common import fail, save_wandb_view
from dropstudy.tracking.console import stderr


def report(
    directory: Path = typer.Argument(..., metavar="DIR", help="A directory of runs: a sweep, a study, runs/.",
                                     show_default=False),
    baseline: List[str] = typer.Option(
        [], "--baseline", metavar="KEY=VALUE", show_default=False,
        help="The setting every other is compared with, e.g. model.dropout=0.5 or dropout_kind=inverted "
             "(repeat for several keys) [default: no dropout, model.dropout=0]."),
) -> None:
    """Tables, statistics and figures over every finished run under DIR (found recursively by
    summary.json and .hydra/config.yaml): per experiment, one row per setting (the config keys that
    vary, other than the seed) and final metric (train/val/test loss and accuracy, gap/loss, best
    epoch) with n, mean ± std and the 95% t interval over seeds; and each setting against the
    baseline: the difference of means with its 95% interval, paired by seed (paired t-test,
    Wilcoxon signed-rank, Cohen's d_z, seeds won) where both ran the same seeds, Welch's t-test and
    Hedges' g otherwise. Writes DIR/report/report.md, report.csv, report.tex (booktabs) and the
    figures as PNG, PDF and SVG, one column wide (metric vs dropout rate, learning curves with 95%
    bands, the regression fit of one seed per setting); when the runs were tracked, logs them to
    one W&B run (job_type report) in their group.
    DIR/report/report.html shows it all on one self-contained page (figures inline, no request),
    with each setting's curves, the runs' provenance and commands: it opens offline and prints.

    Examples:

        dropstudy report runs/regression/2026-11-22_09-00-00-sweep-3f2a

        dropstudy report runs/ --baseline model.dropout=0.5
    """
    if not directory.is_dir():  # said before the report's imports (scipy, matplotlib) cost their seconds
        raise fail(f"{directory}: no such directory; give a directory of runs (a sweep, a study, runs/).")
    from rich.markup import escape

    from dropstudy.report.tables import ReportError, caption, cells, header, skip_reason, table_rows
    from dropstudy.report.write import plan_report, write_report
    from dropstudy.tracking.console import setup_logging

    try:  # everything is read and checked before report/ (and its log) is written
        planned = plan_report(directory, baseline)
    except ReportError as exc:
        raise fail(str(exc))
    for note in planned.notes:
        stderr.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    setup_logging(directory / "report" / "report.log")
    result = write_report(planned)
    from rich.table import Table

    console = Console(width=max(Console().width, 200))  # cells unwrapped: a number is never split
    for table in result.tables:
        shown = Table(title=table.experiment, title_justify="left", caption=caption(table), caption_justify="left")
        for column in header(table):
            shown.add_column(column, justify="left" if column in ("metric", "test", *table.setting_keys) else "right",
                             no_wrap=True)
        rows = table_rows(table)
        for i, (metric, row) in enumerate(rows):
            # A rule under each metric's block of settings, as the LaTeX table leaves a space.
            shown.add_row(*cells(table, metric, row), end_section=i + 1 < len(rows) and rows[i + 1][0] != metric)
        console.print(shown)
    for path, reason in result.skipped:
        stderr.print(escape(f"skipped {path}: {skip_reason(reason)}"), highlight=False, soft_wrap=True)
    for path in result.files.values():
        typer.echo(f"wrote {path}")
    if result.tracker_sync:
        typer.echo(f"W&B (offline): {result.tracker_sync}")
    save_wandb_view(directory, report=True)
