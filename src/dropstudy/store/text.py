"""How records and printed commands spell things: nested configs as dotted keys (`flatten`), and
command lines that paste into a shell as they are (`shell_command`)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any


def shell_path(path: str | Path) -> str:
    """`path` as a command's argument: a relative path that starts with '-' as ./-..., which no
    command reads as an option."""
    text = str(path)
    return f"./{text}" if text.startswith("-") else text


def shell_command(*words: str | Path) -> str:
    """A command line to print, one that pastes into a shell as it is: every word quoted as the
    shell needs, and every path (a Path) made safe by `shell_path`."""
    return shlex.join(shell_path(w) if isinstance(w, Path) else w for w in words)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'dropout': 0.5}} -> {'model.dropout': 0.5}: what W&B's grouping and
    parallel-coordinates panels want. Lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
