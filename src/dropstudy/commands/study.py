"""`dropstudy study`."""

from __future__ import annotations

from contextlib import ExitStack
from typing import List, Optional

import typer

from dropstudy.commands.common import (
    ELSEWHERE_RUN,
    OVERRIDES_HELP,
    checked_config,
    claimed,
    handle_run_errors,
    print_run,
    run_hydra_task,
    save_wandb_view,
    show_config,
    time_line,
    warm_up_wandb,
)
from dropstudy.config.checks import validate_study


def study(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    cfg: bool = typer.Option(False, "--cfg", help="Print the composed, resolved config and exit."),
) -> None:
    """Train every arm of `study.arms` (with and without dropout) on the same data and seed, in one
    W&B group, then draw the comparison figures.

    Examples:

        dropstudy study                                   # regression, dropout 0.0 vs 0.5

        dropstudy study experiment=cifar10 data.root=/data/cifar10

        dropstudy study study.arms=[0.0,0.2,0.5] seed=7

        dropstudy study model.dropout_kind=gaussian eval.mc_samples=50
    """
    overrides = list(overrides or [])
    if cfg:
        return show_config(overrides)
    cfg, study_dir = checked_config(overrides, extra_check=validate_study, command="study")
    warm_up_wandb(cfg)
    from dropstudy.model.dropout import arm_label
    from dropstudy.runs.study import run_study

    with ExitStack() as held:
        held.enter_context(claimed(study_dir, ELSEWHERE_RUN))
        for arm in cfg.study.arms:  # each arm's run dir, as run_study names it
            held.enter_context(claimed(study_dir / arm_label(arm, cfg.model.dropout_kind), ELSEWHERE_RUN, new=False))
        result = handle_run_errors(lambda: run_hydra_task("study", overrides, study_dir, run_study))
    typer.echo(f"study dir: {result.study_dir}  (W&B group {result.group})")
    for arm in result.arms:
        print_run(arm, indent="  ")
    for path in result.figures.values():
        typer.echo(f"comparison figure: {path}")
    typer.echo(f"comparison page: {result.study_dir / 'report.html'}  (self-contained, opens offline)")
    typer.echo(f"study status: {result.status} (study.json)")
    save_wandb_view(result.study_dir)
    typer.echo(time_line(result))
    raise typer.Exit(max(arm.exit_code for arm in result.arms))
