"""`dropstudy sweep`."""

from __future__ import annotations

import json
import logging
import shlex
from typing import List, Optional

import typer
from omegaconf import OmegaConf

from dropstudy.commands.common import (
    ELSEWHERE_SWEEP,
    EXIT_INTERRUPTED,
    OVERRIDES_HELP,
    check_override_syntax,
    check_runnable,
    claimed,
    fail,
    print_sweep_table,
    save_wandb_view,
)
from dropstudy.config.checks import ConfigError
from dropstudy.store.failures import EXIT_IO_ERROR, describe, os_error_in
from dropstudy.store.text import shell_command
from dropstudy.tracking.console import stderr


def write_wandb_sweep_file(overrides: list[str], method: str, metric: str, goal: str) -> None:
    """`sweep --wandb`: check the grid, write the W&B sweep YAML, print how to start it."""
    from dropstudy.sweeps.search import plan_sweep
    from dropstudy.sweeps.wandb_sweep import wandb_sweep_config, write_wandb_sweep

    try:
        # The name and project come from the config the overrides compose; the grid is checked
        # point by point exactly like a multirun's.
        config, checks = wandb_sweep_config(overrides, method, metric, goal)
        plan = plan_sweep(checks)
    except ConfigError as exc:
        raise fail(str(exc))
    first = plan.jobs[0].cfg
    config = {"name": plan.group, "project": first.tracker.project,
              **({"entity": first.tracker.entity} if first.tracker.entity else {}), **config}
    path = write_wandb_sweep(plan.sweep_dir / "wandb_sweep.yaml", config)
    points = len(plan.jobs) if method == "grid" else None
    typer.echo(f"W&B sweep config: {path}" + (f"  ({points} grid points)" if points else ""))
    typer.echo("start the sweep (prints its id), then one agent per machine or GPU:")
    typer.echo(f"  {shell_command('wandb', 'sweep', path)}")
    agent = f"{first.tracker.entity or 'ENTITY'}/{first.tracker.project}/SWEEP_ID"
    typer.echo(f"  {shlex.join(['wandb', 'agent', agent])}")


def sweep(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP + "; comma lists, range(), "
                                                    "glob(), choice() make the grid", show_default=False),
    use_wandb: bool = typer.Option(False, "--wandb", help="Write a W&B sweep YAML (for `wandb agent`) "
                                   "instead of training."),
    method: str = typer.Option("grid", help="With --wandb: grid, random or bayes."),
    metric: str = typer.Option("val/loss", help="With --wandb: the metric the sweep optimises."),
    goal: str = typer.Option("minimize", help="With --wandb: minimize or maximize."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs and their run directories; train nothing."),
) -> None:
    """A Hydra multirun of `train`: one complete run directory per grid point under the sweep
    dir, each its own W&B run in one group named after the sweep (tracker.group overrides it),
    tagged `sweep`. Every grid point's config is checked before anything starts; a job that fails
    does not stop the others. Ends with a table of every job (also in sweep.json in the sweep dir) and
    a non-zero exit code if any job did not finish.

    Launchers: hydra/launcher=basic (default, one job after another), joblib (parallel processes),
    submitit_local, submitit_slurm, or slurm (submitit_slurm with dropstudy's defaults:
    hydra.launcher.partition, timeout_min, gpus_per_node, cpus_per_task, mem_gb, array_parallelism).
    The plugins: pip install 'dropstudy[cluster]'. With sweep.vectorize=true (the default) and the
    basic launcher, grid points that differ only in seed, data.seed or dropout settings train as
    one batch (either experiment; batches of at most sweep.max_members), else the table says why not.
    hydra/sweeper=optuna searches instead (interval(), choice()): each trial returns sweep.objective
    (default val/loss), the table ranks the trials and best.json holds the best parameters.

    Examples:

        dropstudy sweep model.dropout=0,0.1,0.25,0.5 seed=range(0,5)

        dropstudy sweep model.dropout=0,0.5 seed=0,1 hydra/launcher=joblib hydra.launcher.n_jobs=2

        dropstudy sweep experiment=cifar10 model.dropout=0,0.25 hydra/launcher=slurm hydra.launcher.partition=gpu

        dropstudy sweep model.dropout_kind=inverted,gaussian model.dropout=0.1,0.5 hydra.sweep.dir=runs/kinds

        dropstudy sweep --dry-run model.dropout=0,0.5 seed=range(0,3)

        dropstudy sweep --wandb --method random model.dropout=0,0.1,0.25,0.5 seed=range(0,5)

        dropstudy sweep hydra/sweeper=optuna 'model.dropout=interval(0,0.8)' hydra.sweeper.n_trials=20
    """
    from dropstudy.sweeps.plan import batch_reason
    from dropstudy.sweeps.search import plan_sweep

    overrides = list(overrides or [])
    check_override_syntax(overrides, "sweep")
    if use_wandb:
        return write_wandb_sweep_file(overrides, method, metric, goal)
    try:
        plan = plan_sweep(overrides)
    except ConfigError as exc:
        raise fail(str(exc))
    seen_data: set[str] = set()
    for job in plan.jobs:  # device and data once per distinct setting
        key = json.dumps([job.cfg.device, OmegaConf.to_container(job.cfg.data)], sort_keys=True, default=str)
        if key not in seen_data:
            seen_data.add(key)
            check_runnable(job.cfg)
    reason = batch_reason(plan)
    batched = reason is None
    if reason and plan.jobs[0].cfg.sweep.vectorize and plan.launcher == "basic":
        stderr.print(f"sweep.vectorize: one job per member ({reason})", highlight=False)
    mode = "batched" if batched else plan.launcher
    if dry_run:
        typer.echo(f"sweep dir: {plan.sweep_dir}  launcher: {mode}  W&B group: {plan.group}")
        if plan.search:
            typer.echo(f"{plan.search.sweeper} search: {plan.search.n_trials} trials over "
                       + " ".join(f"{k}={v}" for k, v in plan.search.space.items())
                       + f", {plan.search.direction} {plan.search.objective}; its ends checked as:")
        for job in plan.jobs:
            typer.echo(f"  {job.label}" if plan.search else f"  #{job.num} {job.label} -> {job.run_dir}")
        raise typer.Exit()

    # Only now torch and the rest of training: a bad grid point or a dry run never loads them.
    from dropstudy.sweeps.run import (
        SweepJob,
        collect_outcomes,
        launch_multirun,
        mark_unstarted,
        train_batches,
        write_sweep_json,
    )

    with claimed(plan.sweep_dir, ELSEWHERE_SWEEP):
        stderr.print(f"sweep: {len(plan.jobs)} jobs ({mode}) -> {plan.sweep_dir}  W&B group {plan.group}",
                     highlight=False)
        interrupted, exit_interrupted = False, EXIT_INTERRUPTED
        io_error: OSError | None = None  # a write that stopped the batched sweep (disk full)
        try:
            if batched:
                from dropstudy.tracking.console import setup_logging

                setup_logging(plan.sweep_dir / "sweep.log")
                try:
                    stopped = [r for r in train_batches(plan) if r.status == "interrupted"]
                    if stopped:  # the engine checkpointed every member and said so in its summary
                        interrupted, exit_interrupted = True, stopped[0].exit_code
                except Exception as exc:  # the table below says which members got how far
                    io_error = os_error_in(exc)
                    if io_error is None:
                        logging.getLogger("dropstudy").exception(
                            f"batched sweep failed: {type(exc).__name__}: {exc}")
            else:
                launch_multirun(plan, SweepJob(plan.group, plan.search and plan.search.objective))
        except KeyboardInterrupt as exc:
            interrupted, exit_interrupted = True, getattr(exc, "exit_code", EXIT_INTERRUPTED)
            mark_unstarted(plan, exit_interrupted - 128)

        outcomes = collect_outcomes(plan)
        print_sweep_table(f"sweep {plan.sweep_dir} (W&B group {plan.group})", outcomes)
        try:
            summary = write_sweep_json(plan, outcomes, interrupted, mode,
                                       {"error": describe(io_error)} if io_error is not None else None)
        except OSError as exc:
            if io_error is None:
                raise
            io_error.add_note(f"sweep.json was not written either: {describe(exc)}")
    if io_error is not None:  # one line, after the table: the members' summaries name their files
        raise fail(describe(io_error), EXIT_IO_ERROR)
    typer.echo(f"sweep dir: {plan.sweep_dir}  table: {summary}")
    save_wandb_view(plan.sweep_dir)
    if plan.search and outcomes and outcomes[0].rank == 1:
        typer.echo(f"best: #{outcomes[0].num} {outcomes[0].setting}  {plan.search.objective} {outcomes[0].objective:.4g}"
                   f"  ({plan.sweep_dir / 'best.json'})")
    bad = [o for o in outcomes if not o.ok]
    if interrupted:
        what = "every member from its last checkpoint" if batched else "what was interrupted"
        typer.echo(f"to continue {what}: {shell_command('dropstudy', 'resume', plan.sweep_dir)}")
        raise fail(f"interrupted: {len(outcomes) - len(bad)} of {len(outcomes)} jobs finished; the table "
                   "says which ran.", exit_interrupted)
    if bad:
        names = "; ".join(f"#{o.num} ({o.setting or ' '.join(o.overrides)}) {o.status}"
                          + (f": {o.reason}" if o.reason else "") for o in bad)
        raise fail(f"{len(bad)} of {len(outcomes)} sweep jobs did not finish: {names}", 1)
