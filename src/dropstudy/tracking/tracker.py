"""The tracker interface the training loop knows (`Tracker`), and the one that does nothing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch is imported where a tensor is used: config checks and --help need none of it
    from torch import Tensor




class Tracker(Protocol):
    run_id: str | None
    url: str | None
    sync_command: str | None

    def log(self, row: dict[str, Any], step: int) -> None: ...
    def log_histograms(self, tensors: dict[str, Tensor], step: int) -> None: ...
    def log_images(self, images: dict[str, Path], epoch: int, step: int) -> None: ...
    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None: ...
    def set_summary(self, values: dict[str, Any]) -> None: ...
    def use_dataset(self, name: str, metadata: dict[str, Any], reference: str | None = None) -> None: ...
    def use_model(self, name: str, path: Path, metadata: dict[str, Any]) -> None: ...
    def log_checkpoint(self, path: Path, metadata: dict[str, Any], aliases: list[str]) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    run_id = None
    url = None
    sync_command = None

    def log(self, row: dict[str, Any], step: int) -> None:
        pass

    def log_histograms(self, tensors: dict[str, Tensor], step: int) -> None:
        pass

    def log_images(self, images: dict[str, Path], epoch: int, step: int) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        pass

    def set_summary(self, values: dict[str, Any]) -> None:
        pass

    def use_dataset(self, name: str, metadata: dict[str, Any], reference: str | None = None) -> None:
        pass

    def use_model(self, name: str, path: Path, metadata: dict[str, Any]) -> None:
        pass

    def log_checkpoint(self, path: Path, metadata: dict[str, Any], aliases: list[str]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass




def json_safe(value: Any) -> Any:
    """Artifact metadata as JSON takes it: non-finite numbers as None, anything else as text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def first_line(exc: BaseException) -> str:
    """W&B's errors run to several lines of advice; the first says what happened."""
    text = str(exc).strip() or "no message"
    return text.splitlines()[0][:300]
