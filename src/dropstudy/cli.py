"""The `dropstudy` command line: Typer for commands and help, Hydra for config and run directories.

Each command composes and checks the config first (`config.compose`), so bad input ends with
one paragraph and exit code 2 before anything is written. It then hands the same overrides to
a `@hydra.main` task, which creates the run directory, saves `.hydra/` and sets up logging,
exactly as a plain Hydra app would; sweeps reuse the same task with `--multirun`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from omegaconf import DictConfig, OmegaConf

from dropstudy import __version__
from dropstudy.config import ConfigError, compose, conf_dir, validate_study
from dropstudy.console import stderr
from dropstudy.data import DataError, check_cifar10_available

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="dropstudy",
    help=(
        "Overfitting studies in PyTorch: train the same network with and without dropout, track every "
        "metric and gradient histogram in Weights & Biases, and compare.\n\n"
        "Every command takes Hydra overrides (key=value, +key=value, ~key). Runs go to "
        "runs/<experiment>/<time>-<command>/ unless hydra.run.dir=... says otherwise."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

OVERRIDES_HELP = "Hydra overrides, e.g. experiment=cifar10 model.dropout=0.3 trainer.epochs=5 seed=1"
EXTRA_ARGS = {"allow_extra_args": False, "ignore_unknown_options": True}


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    stderr.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def checked_config(
    overrides: list[str], check_data: bool = True, extra_check: Callable[[DictConfig], None] | None = None
) -> DictConfig:
    """Compose + validate, including the device, the data and a command's own `extra_check`,
    or exit 2 with the reason."""
    for arg in overrides:
        if arg.startswith("-"):
            raise fail(f"unknown option {arg!r}: commands take Hydra overrides (key=value); see --help.")
    try:
        cfg = compose(overrides)
        if extra_check is not None:
            extra_check(cfg)
        from dropstudy.runtime import select_device  # torch import deferred: --help stays fast

        select_device(cfg.device)
        if check_data and cfg.data.name == "cifar10":
            check_cifar10_available(cfg.data)
    except (ConfigError, DataError) as exc:
        raise fail(str(exc))
    return cfg


def run_hydra_task(command: str, overrides: list[str], task: Callable[[DictConfig, Path, list[str]], Any]) -> Any:
    """Run `task(cfg, run_dir, overrides)` inside Hydra, so Hydra owns the run directory."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    outcome: dict[str, Any] = {}

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def hydra_task(cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        try:
            outcome["result"] = task(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
        except BaseException as exc:  # re-raised below, outside Hydra's own error reporting
            outcome["error"] = exc

    saved_argv = sys.argv
    sys.argv = [saved_argv[0], *overrides, f"hydra.job.name={command}"]
    try:
        hydra_task()
    finally:
        sys.argv = saved_argv
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def handle_run_errors(fn: Callable[[], Any]) -> Any:
    from dropstudy.data import DataError as _DataError

    try:
        return fn()
    except (ConfigError, _DataError) as exc:
        raise fail(str(exc))
    except KeyboardInterrupt:
        raise fail("interrupted before training started; nothing was trained.", EXIT_INTERRUPTED)


def print_run(result: Any, indent: str = "") -> None:
    out = typer.echo
    out(f"{indent}run dir: {result.run_dir}  [{result.status}]")
    if result.outcome and result.outcome.reason and result.status != "finished":
        out(f"{indent}  {result.status}: {result.outcome.reason}")
    if result.status == "interrupted":
        out(f"{indent}  the last checkpoint is {result.run_dir / 'checkpoints' / 'last.pt'}")
    for name, path in result.figures.items():
        out(f"{indent}  figure: {path}")
    if result.tracker_url:
        out(f"{indent}  W&B: {result.tracker_url}")
    elif result.sync_command:
        out(f"{indent}  W&B (offline): {result.sync_command}")


def show_config(overrides: list[str]) -> None:
    cfg = checked_config(overrides, check_data=False)
    typer.echo(OmegaConf.to_yaml(cfg, resolve=True))


@app.command(context_settings=EXTRA_ARGS)
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
    checked_config(overrides)
    from dropstudy.runner import train_run

    result = handle_run_errors(lambda: run_hydra_task("train", overrides, train_run))
    print_run(result)
    raise typer.Exit(result.exit_code)


@app.command(context_settings=EXTRA_ARGS)
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
    checked_config(overrides, extra_check=validate_study)
    from dropstudy.runner import run_study

    result = handle_run_errors(lambda: run_hydra_task("study", overrides, run_study))
    typer.echo(f"study dir: {result.study_dir}  (W&B group {result.group})")
    for arm in result.arms:
        print_run(arm, indent="  ")
    for path in result.figures.values():
        typer.echo(f"comparison figure: {path}")
    raise typer.Exit(max(arm.exit_code for arm in result.arms))


@app.command()
def demo(
    name: Optional[str] = typer.Argument(None, help="scaling, masks or equivalence", show_default=False),
    list_demos: bool = typer.Option(False, "--list", help="List the demonstrations and exit."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the figures [default: runs/demo/NAME]."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw: the same seed prints the same numbers."),
) -> None:
    """Small, deterministic demonstrations of dropout's mechanics, printed and plotted (no training).

    scaling: training vs evaluation output of a dropout layer, inverted and vanilla.
    masks: the masks drawn over a few steps, and the empirical drop rate vs p.
    equivalence: inverted and vanilla dropout give the same expected output.

    Examples:

        dropstudy demo --list

        dropstudy demo scaling

        dropstudy demo masks --seed 3

        dropstudy demo equivalence --out figures/
    """
    from dropstudy.demos import DEMOS

    if list_demos:
        for key, entry in DEMOS.items():
            typer.echo(f"{key:<12} {entry.summary}")
        raise typer.Exit()
    if name not in DEMOS:
        what = "name a demonstration" if name is None else f"no demonstration called {name!r}"
        raise fail(f"dropstudy demo: {what}; choose one of: {', '.join(DEMOS)} (see dropstudy demo --list).")
    result = DEMOS[name].run(out or Path("runs") / "demo" / name, seed)
    for line in result.lines:
        typer.echo(line)
    for path in result.figures:
        typer.echo(f"figure: {path}")


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dropstudy {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """dropstudy: with/without-dropout studies tracked in W&B."""


def main() -> None:
    app(prog_name="dropstudy")
