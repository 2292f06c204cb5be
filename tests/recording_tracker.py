"""A `Tracker` for tests: it records every call a run makes to it, in order, so a test can hold
what W&B would have been sent against the run directory, in-process and without W&B.

`recording_trackers(monkeypatch)` makes every run this process starts get one: each run path
(single runs, a study's arms, a vectorized sweep's members) creates its tracker through
`dropstudy.execute.make_tracker` (and a study's comparison through `dropstudy.runner.make_tracker`), which are replaced, so the creation arguments (name, group, job
type, tags, config) are recorded too.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor

_run_ids = itertools.count()


class RecordingTracker:
    """Implements dropstudy.tracking.Tracker; `calls` is every call as (method, arguments)."""

    def __init__(self, **created_with: Any):
        self.created_with = created_with
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.run_id = f"recorded-{next(_run_ids)}"
        self.url = None
        self.sync_command = None

    def _record(self, method: str, **arguments: Any) -> None:
        self.calls.append((method, arguments))

    def log(self, row: dict[str, Any], step: int) -> None:
        self._record("log", row=dict(row), step=step)  # a copy: what was sent, whatever the caller does next

    def log_histograms(self, tensors: dict[str, Tensor], step: int) -> None:
        self._record("log_histograms", tensors={k: t.detach().clone() for k, t in tensors.items()}, step=step)

    def log_images(self, images: dict[str, Path], epoch: int, step: int) -> None:
        self._record("log_images", images={k: Path(v) for k, v in images.items()}, epoch=epoch, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self._record("log_table", key=key, columns=list(columns), rows=[list(r) for r in rows], step=step)

    def set_summary(self, values: dict[str, Any]) -> None:
        self._record("set_summary", values=dict(values))

    def use_dataset(self, name: str, metadata: dict[str, Any], reference: str | None = None) -> None:
        self._record("use_dataset", name=name, metadata=dict(metadata), reference=reference)

    def use_model(self, name: str, path: Path, metadata: dict[str, Any]) -> None:
        self._record("use_model", name=name, path=Path(path), metadata=dict(metadata))

    def log_checkpoint(self, path: Path, metadata: dict[str, Any], aliases: list[str]) -> None:
        self._record("log_checkpoint", path=Path(path), metadata=dict(metadata), aliases=list(aliases))

    def finish(self, exit_code: int = 0) -> None:
        self._record("finish", exit_code=exit_code)

    # -- what a test reads ----------------------------------------------------------------------
    def of(self, method: str) -> list[dict[str, Any]]:
        return [arguments for name, arguments in self.calls if name == method]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [c["row"] for c in self.of("log")]

    @property
    def steps(self) -> list[int]:
        return [c["step"] for c in self.of("log")]

    @property
    def summary(self) -> dict[str, Any]:
        """The run's summary as W&B would hold it: every set_summary merged in order."""
        merged: dict[str, Any] = {}
        for call in self.of("set_summary"):
            merged.update(call["values"])
        return merged


def recording_trackers(monkeypatch: pytest.MonkeyPatch) -> list[RecordingTracker]:
    """From now on every run's tracker is a RecordingTracker; returns them in creation order."""
    made: list[RecordingTracker] = []

    def make_tracker(tracker_cfg: Any, **created_with: Any) -> RecordingTracker:
        made.append(RecordingTracker(mode=tracker_cfg.mode, **created_with))
        return made[-1]

    monkeypatch.setattr("dropstudy.runs.execute.make_tracker", make_tracker)  # every run's
    monkeypatch.setattr("dropstudy.runs.study.make_tracker", make_tracker)  # a study's comparison
    return made
