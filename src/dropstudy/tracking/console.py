"""What the terminal shows while training: a rich progress bar on a TTY, plain lines otherwise."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dropstudy.store.failures import writing

log = logging.getLogger("dropstudy")
stderr = Console(stderr=True)


def setup_logging(log_file: Path) -> None:
    """What Hydra's job logging (conf/hydra/job_logging/dropstudy.yaml) sets up, for the
    commands that do not run inside Hydra (rerun, resume): plain console, timestamped file."""
    with writing(log_file, base=log_file.parent):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [console, file]
    root.setLevel(logging.INFO)
    logging.getLogger("wandb").setLevel(logging.WARNING)






def format_row(row: dict[str, Any], keys: tuple[str, ...]) -> str:
    parts = []
    for key in keys:
        value = row.get(key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


ROW_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "val_mc/loss", "val_mc/acc")


class TrainingProgress:
    """Steps of one run. On a TTY: one rich bar with the latest losses and samples/s, moved every
    `every` steps and at each epoch's end. Not on a TTY (CI, log files, SLURM): one line per
    evaluation, at most about `lines` a run (metrics.jsonl has every row), nothing per step."""

    # Rich locks and records a speed sample at every advance, host time that a GPU step of a few
    # milliseconds should not spend, so the bar moves in strides (it redraws 10 times a second anyway).
    every = 16
    # A run that evaluates every 10 of 2000 epochs would print 200 lines; every 5% of the run reads as well.
    lines = 20

    def __init__(self, label: str, total_steps: int, epochs: int, interactive: bool | None = None):
        self.label = label
        self.epochs = epochs
        self.interactive = stderr.is_terminal if interactive is None else interactive
        self._progress: Progress | None = None
        self._task = None
        self._last_val: tuple[float, float | None] | None = None
        self.total_steps = total_steps
        self._pending = 0  # steps done that the bar does not show yet
        self._printed_epoch = 0

    def __enter__(self) -> "TrainingProgress":
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=stderr,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total_steps, status="")
        return self

    def advance(self, steps: int = 1) -> None:
        self._pending += steps
        if self._pending >= self.every:
            self._flush()

    def _flush(self) -> None:
        if self._progress is not None and self._pending:
            self._progress.advance(self._task, self._pending)
        self._pending = 0

    def epoch_done(self, row: dict[str, Any], evaluated: bool) -> None:
        self._flush()
        speed = row.get("perf/samples_per_s")
        text = format_row(row, ROW_KEYS) + (f"  {speed:,.0f} samples/s" if speed else "")
        if self._progress is not None:
            self._progress.update(self._task, status=self._compact(row))
        epoch = row["epoch"]
        due = epoch - self._printed_epoch >= self.epochs / self.lines or epoch >= self.epochs
        if evaluated and self._progress is None and due:
            self._printed_epoch = epoch
            log.info(f"{self.label} epoch {row['epoch']}/{self.epochs}  {text}")

    def _compact(self, row: dict[str, Any]) -> str:
        """Short enough to leave the bar room on an 80-column terminal."""
        if "val/loss" in row:
            self._last_val = row["val/loss"], row.get("val/acc")
        parts = [f"ep {row['epoch']}/{self.epochs}", f"loss {row['train/loss']:.3g}"]
        if self._last_val is not None:
            val_loss, val_acc = self._last_val
            parts.append(f"val {val_loss:.3g}" + (f" ({val_acc:.1%})" if val_acc is not None else ""))
        speed = row.get("perf/samples_per_s")
        if speed:
            parts.append(f"{speed:,.0f}/s")
        return " ".join(parts)

    def __exit__(self, *exc: Any) -> None:
        self._flush()
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
