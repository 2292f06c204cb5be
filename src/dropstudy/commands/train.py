"""`dropstudy train`."""

from __future__ import annotations

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
    show_config,
    warm_up_wandb,
)


def train(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    cfg: bool = typer.Option(False, "--cfg", help="Print the composed, resolved config and exit."),
) -> None:
    """Train one model from the composed config.

    Examples:

        dropstudy train                                   # regression MLP, dropout 0.5

        dropstudy train model.dropout=0 seed=3

        dropstudy train model.dropout_kind=vanilla model.dropout=[0.2,0.5,0.5] eval.mc_samples=50

        dropstudy train model.dropout_schedule.kind=warmup model.dropout_schedule.epochs=500 optim.max_norm=3

        dropstudy train experiment=cifar10 data.synthetic=true trainer.epochs=1

        dropstudy train experiment=cifar10 model.dropout_kind=spatial model.conv_dropout=0.1

        dropstudy train experiment=cifar10 data.root=/data/cifar10 device=cuda
    """
    overrides = list(overrides or [])
    if cfg:
        return show_config(overrides)
    config, run_dir = checked_config(overrides)
    warm_up_wandb(config)
    from dropstudy.runs.execute import train_run

    with claimed(run_dir, ELSEWHERE_RUN):
        result = handle_run_errors(lambda: run_hydra_task("train", overrides, run_dir, train_run))
    print_run(result)
    raise typer.Exit(result.exit_code)
