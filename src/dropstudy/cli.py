"""The `dropstudy` command line: Typer for commands and help, Hydra for config and run directories.

Each command composes and checks the config first (`config.compose`), so bad input ends with
one paragraph and exit code 2 before anything is written. It then hands the same overrides to
a `@hydra.main` task, which creates the run directory, saves `.hydra/` and sets up logging,
exactly as a plain Hydra app would; sweeps reuse the same task with `--multirun`.

Nothing here imports torch, wandb or matplotlib at module level: `--help` and every bad-input
error (exit 2) are answered without them; each command imports what it runs.

Before the task starts, the command resolves the directory Hydra will write (once, then hands
it to Hydra explicitly), locks it and refuses one that already holds a run (`rundir.claim_run_dir`)."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

import typer

from dropstudy import __version__
from dropstudy.commands import dashboard, demo, report, rerun, resume, study, sweep, train
from dropstudy.commands.common import EXTRA_ARGS, fail
from dropstudy.store.failures import EXIT_IO_ERROR, describe, os_error_in
from dropstudy.tracking.console import stderr

app = typer.Typer(
    name="dropstudy",
    help=(
        "Overfitting studies in PyTorch: train the same network with and without dropout, track every "
        "metric and gradient histogram in Weights & Biases, and compare.\n\n"
        "Every command takes Hydra overrides (key=value, +key=value, ~key). Runs go to "
        "`runs/<experiment>/<date>_<time>-<command>-<id>/` unless hydra.run.dir=... says otherwise; "
        "a directory that already holds a run is refused.\n\n"
        "Exit codes: 0 done; 1 a run diverged or failed (or a rerun differs); 2 bad input; "
        f"{EXIT_IO_ERROR} a write failed (disk full, read-only directory, permission denied, file size "
        "limit), named in one message; 130 / 143 interrupted by Ctrl-C / SIGTERM."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)


# The commands in the order `--help` lists them; those that take Hydra overrides pass unknown options on.
for command, settings in ((train.train, EXTRA_ARGS), (study.study, EXTRA_ARGS), (sweep.sweep, EXTRA_ARGS),
                          (resume.resume, None), (rerun.rerun, None), (report.report, None),
                          (dashboard.dashboard, None), (demo.demo, None)):
    app.command(context_settings=settings)(command)


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


def writable(path: Path) -> bool:
    """Whether `path`, or the nearest folder above it that exists, takes writes."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


# Where W&B and matplotlib keep settings and caches, by the environment variable that moves each.
CACHE_VARIABLES = {"XDG_CONFIG_HOME": "config", "XDG_CACHE_HOME": "cache", "MPLCONFIGDIR": "matplotlib",
                   "WANDB_CONFIG_DIR": "wandb-config", "WANDB_CACHE_DIR": "wandb-cache", "WANDB_DATA_DIR": "wandb-data"}


def move_caches_off_a_read_only_home() -> None:
    """With a HOME that takes no writes (a read-only or foreign home on a cluster node), W&B and
    matplotlib each print a screenful of warnings and fall back to throw-away caches; point
    their folders (those the environment does not set already) at one folder of this user's in
    the temp dir instead, and say so in one line. This process's children inherit it."""
    home = Path(os.path.expanduser("~"))
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")
    if writable(config) and writable(cache):
        return
    import tempfile

    base = Path(tempfile.gettempdir()) / f"dropstudy-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        if base.stat().st_uid != os.getuid():  # someone else's folder of that name: use a new one
            base = Path(tempfile.mkdtemp(prefix="dropstudy-"))
    except OSError:
        return  # no writable temp dir either: the tools' own fallbacks are all there is
    moved = [name for name in CACHE_VARIABLES if not os.environ.get(name)]
    for name in moved:
        os.environ[name] = str(base / CACHE_VARIABLES[name])
    if moved:
        stderr.print(f"note: {home} takes no writes; W&B and matplotlib keep their settings and caches in {base}",
                     highlight=False, soft_wrap=True)


def main() -> None:
    # A log file on a full disk must not print a traceback between the lines: the failure that
    # matters is reported once, by the write that stops the run.
    logging.raiseExceptions = False
    move_caches_off_a_read_only_home()
    try:
        app(prog_name="dropstudy")
    except SystemExit as exc:
        exit_now(exc.code)
    except Exception as exc:  # a write outside a run's own error handling (a command's log file)
        cause = os_error_in(exc)
        if cause is None:
            raise
        exit_now(fail(describe(cause), EXIT_IO_ERROR).exit_code)


def exit_now(code: int | str | None) -> NoReturn:
    """Exit with `code` once everything that waits for the end of the process has run (threads
    still working, W&B's shutdown and every other exit handler, log files flushed), skipping
    only the interpreter's teardown of its modules: over a second after a run (torch, matplotlib,
    W&B loaded) that changes nothing on disk or on screen."""
    if isinstance(code, str):  # what sys.exit("message") does
        print(code, file=sys.stderr)
        code = 1
    # What the interpreter's own shutdown does first: the hooks that tell pools' manager threads
    # to stop (loky's, concurrent.futures'), then a join of every non-daemon thread.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), or a closed stream
            pass
    os._exit(code or 0)
