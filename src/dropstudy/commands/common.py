"""What every command shares: bad input as one message and exit 2, run directories claimed, the
run's printout."""

from __future__ import annotations

import copy
import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable

import typer
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from dropstudy.config.checks import ConfigError
from dropstudy.config.compose import compose, conf_dir, hydra_command_line, hydra_value
from dropstudy.data.files import DataError, check_cifar10_available
from dropstudy.store.failures import EXIT_IO_ERROR, describe, os_error_in
from dropstudy.store.text import shell_command
from dropstudy.tracking.console import stderr

EXIT_BAD_INPUT = 2


EXIT_INTERRUPTED = 130


# The clock's origin for the study's time line where /proc cannot say when the process started.
IMPORTED = time.perf_counter()


OVERRIDES_HELP = "Hydra overrides, e.g. experiment=cifar10 model.dropout=0.3 trainer.epochs=5 seed=1"


EXTRA_ARGS = {"allow_extra_args": False, "ignore_unknown_options": True}


# How each command writes somewhere else than a directory it may not use.
ELSEWHERE_RUN = "pick another hydra.run.dir, or leave it out for a new directory"


ELSEWHERE_SWEEP = "pick another hydra.sweep.dir, or leave it out for a new directory"


ELSEWHERE_OUT = "pick another --out, or leave it out for a new directory"


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    from rich.markup import escape

    # Escaped: messages quote user input and commands such as pip install 'dropstudy[cluster]'.
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def check_override_syntax(overrides: list[str], command: str) -> None:
    """Every argument is an override (key=value, +key=value, ~key), or exit 2; a bare word after
    one is most likely the rest of a value with spaces the shell split, so say how to quote it."""
    for i, arg in enumerate(overrides):
        if arg.startswith("-"):
            raise fail(f"unknown option {arg!r}: commands take Hydra overrides (key=value); "
                       f"see dropstudy {command} --help.")
        if "=" in arg or arg.startswith("~"):
            continue
        start = i
        while start > 0 and "=" not in overrides[start]:
            start -= 1
        if "=" in overrides[start]:
            end = i + 1
            while end < len(overrides) and "=" not in overrides[end] and not overrides[end].startswith(("-", "~")):
                end += 1
            whole = " ".join(overrides[start:end])
            raise fail(f"{arg!r} is not an override (key=value): if it is part of the value before it, "
                       f"which has spaces, quote the whole override: {shlex.quote(whole)}")
        raise fail(f"{arg!r} is not an override: use key=value, +key=value or ~key (see dropstudy {command} --help).")


def checked_config(
    overrides: list[str], check_data: bool = True, extra_check: Callable[[DictConfig], None] | None = None,
    command: str = "train",
) -> tuple[DictConfig, Path]:
    """Compose + validate, including the device, the data and a command's own `extra_check`,
    or exit 2 with the reason. Also returns the run directory the overrides name (resolved once)."""
    check_override_syntax(overrides, command)
    try:
        cfg = compose(overrides, command, return_hydra_config=True)
        run_dir = Path(cfg.hydra.run.dir)
        with open_dict(cfg):
            del cfg["hydra"]
        if extra_check is not None:
            extra_check(cfg)
        if check_data and cfg.data.name == "cifar10":
            check_cifar10_available(cfg.data)
        check_device(cfg.device)
    except (ConfigError, DataError) as exc:
        raise fail(str(exc))
    return cfg, run_dir


def check_device(device: str) -> None:
    """An explicit accelerator must exist here, or ConfigError; `auto` and `cpu` always resolve,
    so they are not put to torch, whose import costs seconds."""
    if str(device) in ("auto", "cpu"):
        return
    from dropstudy.engine.runtime import select_device

    select_device(device)


def seconds_since_start() -> float:
    """Wall seconds since this process started (/proc on Linux; elsewhere since this module was
    imported, which misses the interpreter's own start-up)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - IMPORTED


def time_line(result: Any) -> str:
    """Where a study's time went, in one line: everything before the study started (imports,
    config, Hydra), its own account (runs.study.study_timings), and what none of those covers."""
    total = seconds_since_start()
    parts = {"start-up": total - (time.perf_counter() - result.started), **result.timings}
    parts["other"] = total - sum(parts.values())
    return f"time: {total:.1f} s = " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items())


def claimed(path: Path, elsewhere: str, new: bool = True):
    """claim_run_dir (this process's lock on `path`, and when `new` the check that it holds no
    run yet), or exit 2 with its message."""
    from dropstudy.store.rundir import RunDirClaimError, claim_run_dir

    try:
        return claim_run_dir(path, new=new, elsewhere=elsewhere)
    except RunDirClaimError as exc:
        raise fail(str(exc))
    except OSError as exc:
        raise fail(describe(exc), EXIT_IO_ERROR)


def run_hydra_task(command: str, overrides: list[str], run_dir: Path,
                   task: Callable[[DictConfig, Path, list[str]], Any]) -> Any:
    """Run `task(cfg, run_dir, overrides)` inside Hydra, so Hydra writes the run directory's
    `.hydra/` and log, in `run_dir` (as the caller resolved and claimed it)."""
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

    # Hydra's own failures (writing .hydra/ into a read-only run dir) are raised, and reported
    # like any other.
    with hydra_command_line([*overrides, f"hydra.job.name={command}", f"hydra.run.dir={hydra_value(str(run_dir))}"]):
        hydra_task()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def handle_run_errors(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (ConfigError, DataError) as exc:
        raise fail(str(exc))
    except Exception as exc:
        cause = os_error_in(exc)
        if cause is None:
            raise
        raise fail(describe(cause), EXIT_IO_ERROR)
    except KeyboardInterrupt:
        raise fail("interrupted outside the training loop; summary.json in the run directory says where.",
                   EXIT_INTERRUPTED)


def print_run(result: Any, indent: str = "") -> None:
    out = typer.echo
    out(f"{indent}run dir: {result.run_dir}  [{result.status}]")
    if result.outcome and result.outcome.reason and result.status != "finished":
        out(f"{indent}  {result.status}: {result.outcome.reason}")
    if result.status == "interrupted":
        out(f"{indent}  to continue from its last checkpoint: {shell_command('dropstudy', 'resume', Path(result.run_dir))}")
    for name, path in result.figures.items():
        out(f"{indent}  figure: {path}")
    if result.tracker_url:
        out(f"{indent}  W&B: {result.tracker_url}")
    elif result.sync_command:
        out(f"{indent}  W&B (offline): {result.sync_command}")


def warm_up_wandb(cfg: DictConfig) -> None:
    """W&B's import and service start, in the background from here on: they take as long as the
    torch import and the run's set-up that follow, which they no longer wait behind. (Before the
    directory is claimed, so that the claim is held no longer than the run needs it.)"""
    from dropstudy.tracking.wandb_run import warm_up

    warm_up(cfg.tracker.mode)


def show_config(overrides: list[str]) -> None:
    cfg, _ = checked_config(overrides, check_data=False)
    typer.echo(OmegaConf.to_yaml(cfg, resolve=True))


def print_sweep_table(title: str, outcomes: list) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    on_slurm = any(o.slurm for o in outcomes)
    ranked = any(o.rank for o in outcomes)  # an Optuna search: best trial first
    for column in (("rank",) if ranked else ()) + ("#", "overrides", "status", "metric", "run dir") + (
            ("SLURM job",) if on_slurm else ()):
        table.add_column(column, justify="right" if column in ("rank", "#", "metric") else "left")
    for o in outcomes:
        name, value = o.metric
        metric = f"{name} {value:.4g}" if isinstance(value, (int, float)) and value == value else "-"
        color = "green" if o.ok else "red"
        row = ([str(o.rank or "-")] if ranked else []) + [str(o.num), o.setting, f"[{color}]{o.status}[/]", metric,
                                                          str(o.run_dir)]
        if on_slurm:  # where a job that did not finish says why
            row.append("-" if not o.slurm else o.slurm["job_id"] + ("" if o.ok else f" log: {o.slurm['stderr']}"))
        table.add_row(*row)
    Console(width=max(Console().width, 160)).print(table)


def overridden(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """A saved config with key=value overrides of keys it already has, checked like new input."""
    from omegaconf.errors import OmegaConfBaseException

    from dropstudy.config.checks import validate

    for arg in overrides:
        if "=" not in arg or arg.startswith(("+", "~", "-")):
            raise fail(f"{arg!r}: rerun takes key=value overrides of keys the run already has.")
    merged = copy.deepcopy(cfg)
    OmegaConf.set_struct(merged, True)
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or str(exc).splitlines()[0]
        raise fail(f"{key}: not a key of this run's config; rerun can only change existing keys.")
    try:
        validate(merged)
    except ConfigError as exc:
        raise fail(str(exc))
    return merged


def load_saved_run(run_dir: Path) -> tuple[DictConfig, list[str]]:
    from dropstudy.store.rundir import RunDir, RunDirError

    if run_dir.exists() and not run_dir.is_dir():
        raise fail(f"{run_dir} is a file, not a directory; give the run directory (the folder with "
                   ".hydra/config.yaml and summary.json).")
    try:
        cfg = RunDir.existing(run_dir).read_config()
    except RunDirError as exc:
        raise fail(str(exc))
    return cfg, RunDir.existing(run_dir).read_overrides()


def check_runnable(cfg: DictConfig) -> None:
    try:
        if cfg.data.name == "cifar10":
            check_cifar10_available(cfg.data)
        check_device(cfg.device)
    except (ConfigError, DataError) as exc:
        raise fail(str(exc))


def save_wandb_view(directory: Path, report: bool = False) -> None:
    """The W&B view (or `report`) of what a command just made (dropstudy.dashboard); one line,
    whatever happens."""
    from dropstudy.report.dashboard import after_command

    after_command(directory, say=typer.echo, report=report)
