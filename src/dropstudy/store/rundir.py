"""The run directory: every file a run leaves behind, and how each is written.

    .hydra/config.yaml .hydra/overrides.yaml   resolved config (Hydra writes these for `train`)
    provenance.json                            command line, git state, versions, device, host
    metrics.jsonl                              one JSON object per logged step
    summary.json                               status (`running` from the start), final/best metrics
    checkpoints/last.pt                        model, optimizer, RNG states, epoch (atomic)
    plots/*.png                                figures, also logged to W&B
    wandb/                                     W&B's own files

`RunDir` is the one place that reads or writes these files; every problem reading one back is a
`RunDirError` naming the file and what is wrong with it (not a run, a truncated or corrupt
checkpoint, a checkpoint written by another config or for another model).

Files a reader may see half-written are written to a temporary name and renamed. Every write
goes through `failures.writing`: a failed one (disk full, read-only) leaves no temporary file
and raises a WriteError naming the file.

A directory belongs to one run (or study, or sweep): `claim_run_dir` refuses one that already
holds a run, and holds an exclusive lock (`.lock`) on it while this process writes it.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import io
import json
import math
import os
import pickle
import platform
import shlex
import socket
import subprocess
import sys
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from omegaconf import DictConfig, OmegaConf

from dropstudy.config.checks import ConfigError, validate
from dropstudy.store.failures import WriteError, writing
from dropstudy.store.text import flatten, shell_command

if TYPE_CHECKING:  # torch is imported where a tensor is read or written: claiming a directory needs none
    import torch

STATUSES = ("running", "finished", "diverged", "interrupted", "failed")
# The statuses a run ends with for good: training the same config again ends the same way, so
# resume leaves such runs (and batch members) as they are.
ENDED = ("finished", "diverged")
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "rng", "config")
# Keys that say where or how a run is watched, not what is computed: they may differ between
# a checkpoint and the run that resumes it.
NOT_COMPUTATION = ("tracker.", "device", "trainer.checkpoint_every", "trainer.eval_batch_size")


class RunDirError(Exception):
    """A run directory or one of its files cannot be used; the message names the file."""


def _json_default(value: Any) -> Any:
    # A tensor exists only once torch is imported; claiming a directory must not import it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)  # a Path, an Enum member, ...


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
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getbuffer(), base)


def _metrics_row(line: bytes) -> dict | None:
    """One line of metrics.jsonl as its row, or None when it is not one."""
    try:
        row = json.loads(line)
    except ValueError:  # also a line that is not UTF-8
        return None
    return row if isinstance(row, dict) and "epoch" in row else None


class RunDir:
    """A run directory; `RunDir(path)` creates it to write a run, `RunDir.existing(path)` reads
    one back without creating anything."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if create:
            with writing(self.path, operation="create the run directory"):
                self.path.mkdir(parents=True, exist_ok=True)
        self.plots = self.path / "plots"
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.config_path = self.path / ".hydra" / "config.yaml"
        self.checkpoint_path = self.checkpoints / "last.pt"
        self._metrics = None
        self.torn_line: int | None = None  # set by read_metrics

    @classmethod
    def existing(cls, path: str | Path) -> "RunDir":
        return cls(path, create=False)

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

    def _study_arms(self) -> str | None:
        """The arms' directories when this is a study directory (for the message that says so)."""
        study = self.path / "study.json"
        if not study.is_file():
            return None
        try:
            return ", ".join(a["run_dir"] for a in json.loads(study.read_text())["arms"])
        except (OSError, ValueError, KeyError, TypeError):
            return "its arms' directories"

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> DictConfig:
        """The resolved config the run was made with, checked as new input is."""

        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such directory.")
        arms = self._study_arms()
        if arms is not None and not self.config_path.is_file():
            raise RunDirError(f"{self.path} is a study directory; give one of its runs: {arms}.")
        if not self.config_path.is_file():
            raise RunDirError(f"{self.config_path}: missing, so {self.path} is not a dropstudy run directory "
                              "(or it was never started).")
        try:
            cfg = OmegaConf.load(self.config_path)
            if "study" in cfg and arms is not None:
                raise RunDirError(f"{self.path} is a study directory; give one of its runs: {arms}.")
            validate(cfg)
        except ConfigError as exc:
            raise RunDirError(f"{self.config_path}: {exc}") from exc
        except RunDirError:
            raise
        except Exception as exc:
            raise RunDirError(f"{self.config_path}: not a readable dropstudy config "
                              f"({type(exc).__name__}: {exc}).") from exc
        return cfg

    def read_config_dict(self) -> dict:
        """The saved config as plain data, unchecked (a report reads what is there)."""
        return OmegaConf.to_container(OmegaConf.load(self.config_path)) or {}

    def read_overrides(self) -> list[str]:
        path = self.path / ".hydra" / "overrides.yaml"
        return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []

    def job_name(self) -> str | None:
        """The Hydra job that made this directory (`train`, `study`, ...), from .hydra/hydra.yaml."""
        path = self.path / ".hydra" / "hydra.yaml"
        return OmegaConf.select(OmegaConf.load(path), "hydra.job.name") if path.is_file() else None

    def read_status(self) -> tuple[str, dict]:
        """The status and summary: `not run` without a directory, `failed` without a readable
        summary (the run died before writing one)."""
        if not self.path.is_dir():
            return "not run", {}
        try:
            summary = self.read_summary()
        except (OSError, ValueError):
            return "failed", {}
        return summary.get("status", "failed"), summary

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
        """The rows as logged; NaN/inf, written as strings, come back as floats. A half-written
        last line (what a crash in the middle of a write leaves) is left out, and `torn_line`
        says which line it was; any other line that is not a row is a RunDirError naming the
        file and the line, since rows after it mean the file was damaged, not cut short."""
        self.torn_line = None
        if not self.metrics_path.is_file():
            return []
        lines = [(number, line) for number, line in enumerate(self.metrics_path.read_bytes().split(b"\n"), start=1)
                 if line.strip()]
        rows = []
        for number, line in lines:
            row = _metrics_row(line)
            if row is None:
                if number == lines[-1][0]:
                    self.torn_line = number
                    break
                raise RunDirError(
                    f"{self.metrics_path}: line {number} is not a metrics row (a JSON object with an epoch), and "
                    "rows follow it: the file is damaged, not cut short by a crash. Restore it, or start a new run.")
            rows.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in row.items()})
        return rows

    def torn_tail(self) -> str | None:
        """What the last `read_metrics` left out, in words; None when every line was a row."""
        if self.torn_line is None:
            return None
        return f"{self.metrics_path}: line {self.torn_line}, the last, is half-written (the run stopped while writing it)"

    # -- summary, provenance, checkpoints -------------------------------------------------
    def write_summary(self, summary: dict) -> None:
        assert summary.get("status") in STATUSES, summary.get("status")
        write_json_atomic(self.summary_path, {k: _clean(v) for k, v in summary.items()}, self.path)

    def read_summary(self) -> dict:
        return json.loads(self.summary_path.read_text())

    def write_provenance(self, provenance: dict) -> None:
        write_json_atomic(self.path / "provenance.json", provenance, self.path)

    def read_provenance(self) -> dict:
        """provenance.json ({} without one); a damaged one is a RunDirError naming it."""
        path = self.path / "provenance.json"
        if not path.is_file():
            return {}
        try:
            provenance = json.loads(path.read_bytes())
        except ValueError as exc:  # also bytes that are not UTF-8
            raise RunDirError(f"{path}: not readable JSON ({exc}), so the record of how this run was made "
                              "is damaged.") from None
        if not isinstance(provenance, dict):
            raise RunDirError(f"{path}: not a provenance record (a JSON object).")
        return provenance

    def update_provenance(self, **fields: Any) -> None:
        write_json_atomic(self.path / "provenance.json", {**self.read_provenance(), **fields}, self.path)

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """Keep only `rows` (a resumed run drops what was logged after its checkpoint)."""
        self.close()
        write_bytes_atomic(self.metrics_path,
                           "".join(json.dumps(r, default=_json_default) + "\n" for r in rows).encode(), self.path)

    def forget_attempt(self) -> None:
        """Drop the rows and status of an attempt that never reached a checkpoint, before the run
        starts again from scratch: metrics.jsonl is appended to, and must hold this run's rows only."""
        self.close()
        for path in (self.metrics_path, self.summary_path):
            with writing(path, base=self.path, operation="remove"):
                path.unlink(missing_ok=True)

    def holds_rows(self) -> bool:
        return self.metrics_path.exists()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def read_checkpoint(self, cfg: DictConfig | None = None) -> dict[str, Any]:
        """checkpoints/last.pt, read and (given the run's config) checked against it."""
        path = self.checkpoint_path
        if not path.is_file():
            raise RunDirError(f"{path}: missing; the run stopped before its first checkpoint, so start it again instead.")
        import torch

        try:
            # The checkpoint holds NumPy/Python RNG states, which weights_only loading refuses;
            # it is the user's own file from their own run directory.
            state = torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
            raise RunDirError(f"{path}: cannot be read, it is truncated or corrupt ({type(exc).__name__}: {exc}).") from exc
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise RunDirError(f"{path}: not a dropstudy checkpoint (missing {', '.join(missing)}).")
        if cfg is not None:
            differences = computation_differences(state["config"], OmegaConf.to_container(cfg, resolve=True))
            if differences:
                raise RunDirError(
                    f"{path} was written with a different config than {self.config_path}: "
                    + "; ".join(differences[:5])
                    + (f" (and {len(differences) - 5} more)" if len(differences) > 5 else "")
                    + "."
                )
        return state

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


def read_status(run_dir: Path) -> tuple[str, dict]:
    return RunDir.existing(run_dir).read_status()


def computation_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """`key: a -> b` for every config value that changes what a run computes."""

    fa, fb = flatten(a), flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [
        f"{k}: {fa.get(k, '<absent>')!r} -> {fb.get(k, '<absent>')!r}"
        for k in keys
        if fa.get(k) != fb.get(k) and not k.startswith(NOT_COMPUTATION)
    ]


def check_fits(path: Path, state: dict[str, Any], model: torch.nn.Module) -> None:
    """The checkpoint's weights must match the model the config builds, name for name and shape
    for shape."""
    own = model.state_dict()
    theirs = state["model"]
    missing = sorted(set(own) - set(theirs))
    extra = sorted(set(theirs) - set(own))
    shapes = [k for k in set(own) & set(theirs) if tuple(own[k].shape) != tuple(theirs[k].shape)]
    if missing or extra or shapes:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(extra[:3])}" if extra else "",
                ", ".join(f"{k} is {tuple(theirs[k].shape)} there, {tuple(own[k].shape)} here" for k in sorted(shapes)[:3]),
            )
            if part
        )
        raise RunDirError(f"{path}: its weights are for a different model ({detail}).")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def git_state() -> tuple[dict, str]:
    """Commit and dirty flag of the checkout dropstudy runs from (else the working directory's),
    and the diff against that commit when the tree is dirty. Asked once per process: the code a
    process runs is what it imported at its start, and a sweep's members would otherwise each
    pay four git calls."""
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
    import torch

    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return versions


def collect_provenance(device: str, overrides: list[str], data_source: str, data_sha256: str, run: RunDir) -> dict:
    """Everything needed to say what produced a run; a dirty tree's diff goes to git.diff."""
    git, diff = git_state()
    git = dict(git)  # the cached one stays as git said
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


# --------------------------------------------------------------------------- ownership

# Files that show a directory holds a run, a study or a sweep (Hydra writes multirun.yaml into
# a sweep dir first). The lock file is not one: a killed writer leaves it behind.
RUN_MARKERS = ("study.json", "sweep.json", "multirun.yaml", ".hydra/config.yaml", "summary.json", "metrics.jsonl",
               "checkpoints", "provenance.json")
LOCK_NAME = ".lock"


class RunDirClaimError(Exception):
    """A directory this command may not write: one message naming it and what to do."""


def run_marker(path: Path) -> Path | None:
    """The first file showing that `path`, or a folder right inside it (a study's arms, a sweep's
    jobs), holds a run; None for a missing or empty directory, or one with other files only."""
    path = Path(path)
    if not path.is_dir():
        return None
    for where in (path, *sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))):
        for name in RUN_MARKERS:
            if (where / name).exists():
                return where / name
    return None


def describe_holding(path: Path, marker: Path) -> str:
    """What `run_marker` found, in words: "a study (study.json)", "runs (0/summary.json)"."""
    found = marker.relative_to(path).as_posix()
    if found not in RUN_MARKERS:
        what = "runs"  # in a folder inside it
    else:
        what = {"study.json": "a study", "sweep.json": "a sweep", "multirun.yaml": "a sweep"}.get(found, "a run")
    return f"{what} ({found})"


class RunDirLock:
    """An exclusive `flock` on `<dir>/.lock`, which holds the holder's pid, host and command line.
    The OS drops the lock when the process dies, so a killed run never blocks its directory.
    Re-entrant within a process (a command and the code it calls may both claim a directory)."""

    _held: ClassVar[dict[Path, list]] = {}  # resolved dir -> [fd, claims, remove_if_empty], this process's locks

    def __init__(self, path: str | Path, remove_if_empty: bool = False):
        self.path = Path(path)
        self.remove_if_empty = remove_if_empty
        self.file = self.path / LOCK_NAME
        self._key: Path | None = None

    def acquire(self) -> Self:
        key = self.path.resolve()
        if key in self._held:
            self._held[key][1] += 1
            self._key = key
            return self
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirClaimError(
                    f"{self.path} is being written by {self.holder()}; wait for it or use another directory."
                ) from None
            try:
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # The holder released it and removed the file (and the folder, if it stayed empty) between
            # our open and flock: take a new one.
            os.close(fd)
            self.path.mkdir(parents=True, exist_ok=True)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                                  "since": now_iso()}) + "\n").encode())
        self._held[key] = [fd, 1, self.remove_if_empty]
        self._key = key
        return self

    def holder(self) -> str:
        """Who holds the lock, as its lock file says ("another process" while it is being written)."""
        try:
            info = json.loads(self.file.read_text())
            return f"pid {info['pid']} ({info['command']}) on host {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._key is None:
            return
        entry = self._held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[self._key]
            # Removed while still locked: a process that opened the old file sees it is gone and retries.
            try:
                self.file.unlink()
                if entry[2]:
                    self.path.rmdir()  # only succeeds when nothing was written into it
            except OSError:
                pass
            os.close(entry[0])
        self._key = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _command_line() -> str:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    return shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else "?"


def refuse_used(path: str | Path, elsewhere: str) -> None:
    """RunDirClaimError when `path` already holds a run, a study or a sweep (see run_marker);
    `elsewhere` says how this command writes somewhere else (e.g. "pick another hydra.run.dir")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirClaimError(f"{path} is a file, not a directory; {elsewhere}.")
    marker = run_marker(path)
    if marker is not None:
        raise RunDirClaimError(
            f"{path} already holds {describe_holding(path, marker)}; a directory holds one run, study or sweep. "
            f"To continue it: {shell_command('dropstudy', 'resume', path)}; to start a new one, {elsewhere}."
        )
    refuse_inside(path, elsewhere)


def refuse_inside(path: Path, elsewhere: str) -> None:
    """RunDirClaimError when a folder above `path` is a run, study, sweep or rerun directory."""
    outer = enclosing_marker(path)
    if outer is not None:
        what = {"study.json": "a study", "sweep.json": "a sweep", "multirun.yaml": "a sweep",
                "rerun.json": "a rerun"}.get(outer.name, "a run")
        raise RunDirClaimError(
            f"{path} lies inside {_shown(outer.parent)}, which holds {what} ({outer.relative_to(outer.parent)}): only "
            f"that {what.split()[1]} makes directories in it (a report over it would count another run there as "
            f"one of its own); {elsewhere}."
        )


# Files that show a folder is a run, study, sweep or rerun directory, which nothing but its own
# command writes a run into (a study its arms, a sweep its jobs, a rerun its runs).
ENCLOSING_MARKERS = ("summary.json", "study.json", "sweep.json", "multirun.yaml", ".hydra/config.yaml", "rerun.json")


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it, else absolute."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def enclosing_marker(path: Path) -> Path | None:
    """The marker file of the nearest folder above `path` that is a run, study, sweep or rerun
    directory; None when no folder above it is one."""
    for parent in Path(os.path.abspath(path)).parents:
        for name in ENCLOSING_MARKERS:
            if (parent / name).is_file():
                return parent / name
    return None


def claim_run_dir(path: str | Path, *, new: bool = True, elsewhere: str = "pick another directory") -> RunDirLock:
    """Lock `path` for this process (creating it) and, when `new`, check that it holds no run yet
    (`refuse_used`): in that order, so two commands started together cannot both pass the check.
    Returns the held lock, a context manager that releases it (and removes the directory when
    this call created it and nothing was written); RunDirClaimError says why not."""
    path = Path(path)
    if new and not path.exists():  # before the lock, which would create folders inside the outer one
        refuse_inside(path, elsewhere)
    if path.exists() and not path.is_dir():
        raise RunDirClaimError(f"{path} is a file, not a directory; {elsewhere}.")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(path, remove_if_empty=created).acquire()
    except OSError as exc:  # a read-only or full file system: the machine's failure, not the input's
        raise WriteError(exc, path / LOCK_NAME, path, "write") from None
    if new:
        try:
            refuse_used(path, elsewhere)
        except RunDirClaimError:
            lock.release()
            raise
    return lock


def batch_record(provenance: dict[str, Any]) -> dict[str, Any] | None:
    """A member's `batch` provenance block, with its batch `number` (earlier versions wrote the
    block as `vectorized`, the number as `chunk`)."""
    batch = provenance.get("batch") or provenance.get("vectorized")
    if not isinstance(batch, dict):
        return None
    return {**batch, "number": batch.get("number", batch.get("chunk", 0))}
