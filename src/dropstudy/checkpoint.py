"""Reading a run back: its saved config and its checkpoint, each checked before it is trusted.

Every problem is a `RunDirError` naming the file and what is wrong with it: a directory that is
not a run, a truncated or corrupt checkpoint, a checkpoint written by another config or for
another model.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dropstudy.config import ConfigError, validate
from dropstudy.tracking import flatten

REQUIRED_KEYS = ("epoch", "model", "optimizer", "rng", "config")
# Keys that say where or how a run is watched, not what is computed: they may differ between
# a checkpoint and the run that resumes it.
NOT_COMPUTATION = ("tracker.", "device", "trainer.checkpoint_every", "trainer.eval_batch_size")


class RunDirError(Exception):
    """A run directory or one of its files cannot be used; the message names the file."""


def load_run_config(run_dir: Path) -> DictConfig:
    """The resolved config a run was made with (`.hydra/config.yaml`), checked as new input is."""
    path = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such directory.")
    if (run_dir / "study.json").is_file() and not path.is_file():
        arms = [a["run_dir"] for a in json.loads((run_dir / "study.json").read_text())["arms"]]
        raise RunDirError(f"{run_dir} is a study directory; give one of its runs: {', '.join(arms)}.")
    if not path.is_file():
        raise RunDirError(f"{path}: missing, so {run_dir} is not a dropstudy run directory (or it was never started).")
    try:
        cfg = OmegaConf.load(path)
        if "study" in cfg and (run_dir / "study.json").is_file():
            arms = [a["run_dir"] for a in json.loads((run_dir / "study.json").read_text())["arms"]]
            raise RunDirError(f"{run_dir} is a study directory; give one of its runs: {', '.join(arms)}.")
        validate(cfg)
    except ConfigError as exc:
        raise RunDirError(f"{path}: {exc}") from exc
    except RunDirError:
        raise
    except Exception as exc:
        raise RunDirError(f"{path}: not a readable dropstudy config ({type(exc).__name__}: {exc}).") from exc
    return cfg


def computation_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """`key: a -> b` for every config value that changes what a run computes."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [
        f"{k}: {fa.get(k, '<absent>')!r} -> {fb.get(k, '<absent>')!r}"
        for k in keys
        if fa.get(k) != fb.get(k) and not k.startswith(NOT_COMPUTATION)
    ]


def load_checkpoint(run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """checkpoints/last.pt, read and checked against the run's config."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        raise RunDirError(f"{path}: missing; the run stopped before its first checkpoint, so start it again instead.")
    try:
        # The checkpoint holds NumPy/Python RNG states, which weights_only loading refuses;
        # it is the user's own file from their own run directory.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise RunDirError(f"{path}: cannot be read, it is truncated or corrupt ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise RunDirError(f"{path}: not a dropstudy checkpoint (missing {', '.join(missing)}).")
    differences = computation_differences(state["config"], OmegaConf.to_container(cfg, resolve=True))
    if differences:
        raise RunDirError(
            f"{path} was written with a different config than {run_dir / '.hydra' / 'config.yaml'}: "
            + "; ".join(differences[:5])
            + (f" (and {len(differences) - 5} more)" if len(differences) > 5 else "")
            + "."
        )
    return state


def check_fits(path: Path, state: dict[str, Any], model: nn.Module) -> None:
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
