"""Failures of the machine, not of the input: a disk that is full, read-only or not ours, a file
size limit. Each write to a run directory (or the data cache) goes through `writing`, which
removes its temporary file and makes the error name the file; `describe` turns any OSError
into the one line the CLI prints, and the CLI exits with EXIT_IO_ERROR.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# sysexits.h EX_IOERR: "an error occurred while doing I/O on some file". Distinct from 1 (a run
# that diverged or a job that failed) and 2 (bad input), so scripts can tell a full disk apart.
EXIT_IO_ERROR = 74

_HINTS = {
    errno.EFBIG: "a file size limit, ulimit -f, is in force",
    errno.EROFS: "the file system is mounted read-only",
    errno.EACCES: "this user may not write there",
    errno.EPERM: "this user may not write there",
}


# Errors only a write gives, so a bare OSError with one of them is a failed write.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or an explicit cause (logging.config, for one, reports
    a log file it cannot open as a ValueError raised from the OSError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__
    return None


class WriteError(OSError):
    """An OSError that says which file could not be written, and in which directory."""

    def __init__(self, cause: OSError, path: Path, base: Path | None, operation: str):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path, self.base, self.operation = Path(path), base, operation


@contextmanager
def writing(path: Path, *, tmp: Path | None = None, base: Path | None = None,
            operation: str = "write") -> Iterator[None]:
    """Run the write of `path` (through `tmp`, when it is written atomically). An OSError comes
    out as a WriteError naming `path` (relative to `base`, the run directory), and `tmp` is gone:
    a half-written temporary file would only take more of a full disk."""
    try:
        yield
    except WriteError:
        remove_quietly(tmp)
        raise
    except OSError as exc:
        remove_quietly(tmp)
        raise WriteError(exc, path, base, operation) from exc


def remove_quietly(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the directory itself went read-only: nothing more can be cleaned


def free_space(path: Path) -> str:
    """'12 MB free on /mnt/data' for the file system holding `path` (or its nearest parent)."""
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    mount = where
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return "free space unknown"
    return f"{_size(free)} free on {mount}"


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:.0f} {unit}" if n >= 10 else f"{n:.1f} {unit}"


def describe(exc: OSError) -> str:
    """One line for the user: what could not be done to which file, the system's reason, and
    free space (disk full) or a hint (read-only, permissions, size limit)."""
    if isinstance(exc, WriteError):
        base = exc.base
        try:
            shown = exc.path.relative_to(base) if base is not None else exc.path
        except ValueError:
            shown, base = exc.path, None
        where = f"{shown} in {base}" if base is not None else str(shown)
        message = f"cannot {exc.operation} {where}: {exc.strerror}"
        path = exc.path
    else:
        path = Path(exc.filename) if exc.filename else None
        verb = "write" if exc.errno in _WRITE_ERRNOS else "access"
        message = f"cannot {verb} {path}: {exc.strerror or exc}" if path is not None else f"{exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and path is not None:
        message += f" ({free_space(path)})"
    elif exc.errno in _HINTS:
        message += f" ({_HINTS[exc.errno]})"
    message += "."
    # Notes say what else the failure stopped (e.g. summary.json could not be updated either).
    return " ".join([message, *getattr(exc, "__notes__", [])])
