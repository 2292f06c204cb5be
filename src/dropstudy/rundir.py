"""The run directory: every file a run leaves behind, and how each is written.

    .hydra/config.yaml .hydra/overrides.yaml   resolved config (Hydra writes these for `train`)
    provenance.json                            command line, git state, versions, device, host
    metrics.jsonl                              one JSON object per logged step
    summary.json                               status (`running` from the start), final/best metrics
    checkpoints/last.pt                        model, optimizer, RNG states, epoch (atomic)
    plots/*.png                                figures, also logged to W&B
    wandb/                                     W&B's own files

Files a reader may see half-written are written to a temporary name and renamed. Every write
goes through `failures.writing`: a failed one (disk full, read-only) leaves no temporary file
and raises a WriteError naming the file.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dropstudy.failures import writing

STATUSES = ("running", "finished", "diverged", "interrupted", "failed")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf; write them as strings a reader can still recognise."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_bytes_atomic(path: Path, data: bytes | memoryview, base: Path | None = None) -> None:
    """`path` holds either its old content or all of `data`, never a part of it."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, tmp=tmp, base=base):
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


def write_json_atomic(path: Path, payload: dict, base: Path | None = None) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, default=_json_default) + "\n").encode(), base)


def save_torch_atomic(obj: Any, path: Path, base: Path | None = None) -> None:
    """torch.save through memory: torch's own file writer reports a full disk as a RuntimeError
    without errno, and Python's write gives the OSError that says why."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getbuffer(), base)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with writing(self.path, operation="create the run directory"):
            self.path.mkdir(parents=True, exist_ok=True)
        self.plots = self.path / "plots"
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self._metrics = None

    # -- config -------------------------------------------------------------------------
    def write_config(self, cfg: DictConfig, overrides: list[str]) -> None:
        """The `.hydra/` files Hydra writes for a run, for runs it does not launch itself
        (the arms of a study)."""
        hydra_dir = self.path / ".hydra"
        with writing(hydra_dir, base=self.path, operation="create"):
            hydra_dir.mkdir(exist_ok=True)
        write_bytes_atomic(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode(), self.path)
        write_bytes_atomic(hydra_dir / "overrides.yaml",
                           OmegaConf.to_yaml(OmegaConf.create(list(overrides))).encode(), self.path)

    # -- metrics ------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        with writing(self.metrics_path, base=self.path):
            if self._metrics is None:
                self._metrics = self.metrics_path.open("a", buffering=1)  # line-buffered: a line is a step
            self._metrics.write(json.dumps({k: _clean(v) for k, v in row.items()}, default=_json_default) + "\n")

    def close(self) -> None:
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            with writing(self.metrics_path, base=self.path):
                metrics.close()

    def read_metrics(self) -> list[dict]:
        """The rows as logged; NaN/inf, written as strings, come back as floats."""
        if not self.metrics_path.is_file():
            return []
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        return [{k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in row.items()} for row in rows]

    # -- summary, provenance, checkpoints -------------------------------------------------
    def write_summary(self, summary: dict) -> None:
        assert summary.get("status") in STATUSES, summary.get("status")
        write_json_atomic(self.summary_path, {k: _clean(v) for k, v in summary.items()}, self.path)

    def read_summary(self) -> dict:
        return json.loads(self.summary_path.read_text())

    def write_provenance(self, provenance: dict) -> None:
        write_json_atomic(self.path / "provenance.json", provenance, self.path)

    def read_provenance(self) -> dict:
        path = self.path / "provenance.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_provenance(self, **fields: Any) -> None:
        write_json_atomic(self.path / "provenance.json", {**self.read_provenance(), **fields}, self.path)

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """Keep only `rows` (a resumed run drops what was logged after its checkpoint)."""
        self.close()
        write_bytes_atomic(self.metrics_path,
                           "".join(json.dumps(r, default=_json_default) + "\n" for r in rows).encode(), self.path)

    def save_checkpoint(self, state: dict, name: str = "last.pt") -> Path:
        """Write to a temporary file and rename, so `last.pt` is always a complete checkpoint: a
        write that fails leaves the previous one as it was."""
        with writing(self.checkpoints, base=self.path, operation="create"):
            self.checkpoints.mkdir(exist_ok=True)
        target = self.checkpoints / name
        save_torch_atomic(state, target, self.path)
        return target

    def plot_path(self, name: str) -> Path:
        with writing(self.plots, base=self.path, operation="create"):
            self.plots.mkdir(exist_ok=True)
        return self.plots / name


# --------------------------------------------------------------------------- provenance


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[dict, str]:
    """Commit and dirty flag of the checkout dropstudy runs from (else the working directory's),
    and the diff against that commit when the tree is dirty."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        commit = _git(["rev-parse", "HEAD"], where)
        if commit:
            status = _git(["status", "--porcelain", "--untracked-files=no"], where)
            diff = _git(["diff", "HEAD"], where) if status else ""
            root = _git(["rev-parse", "--show-toplevel"], where)
            return {"commit": commit, "dirty": bool(status), "root": root}, diff or ""
    return {"commit": None, "dirty": None, "root": None}, ""


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("dropstudy", "torch", "torchvision", "wandb", "hydra-core", "omegaconf", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return versions


def collect_provenance(device: str, overrides: list[str], data_source: str, data_sha256: str, run: RunDir) -> dict:
    """Everything needed to say what produced a run; a dirty tree's diff goes to git.diff."""
    git, diff = git_state()
    if diff:
        with writing(run.path / "git.diff", base=run.path):
            (run.path / "git.diff").write_text(diff + "\n")
        git["diff_file"] = "git.diff"
    return {
        # orig_argv: the command as typed, before the CLI hands Hydra its own argv.
        "command": shlex.join(sys.orig_argv),
        "overrides": list(overrides),
        "git": git,
        "versions": package_versions(),
        "device": device,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "data": data_source,
        "data_sha256": data_sha256,
        "started": now_iso(),
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

