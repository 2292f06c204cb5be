"""Composing a config from overrides with Hydra (the one composition path of the CLI, tests and scripts)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from dropstudy.config.checks import ConfigError, choice_text, validate
from dropstudy.config.schema import CHOICE_KEYS, GROUP_KEYS


def conf_dir() -> Path:
    """`conf/` inside the installed package (wheel), else the checkout's top-level `conf/`."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dropstudy's conf/ directory was not found next to {package}")


def _omegaconf_cause(exc: BaseException) -> OmegaConfBaseException | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _valid_keys(full_key: str) -> str:
    """The keys allowed beside `full_key`, read from the default config."""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    try:
        base = compose([], resolve=False)
        node = OmegaConf.select(base, parent) if parent else base
        keys = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        keys = []
    where = f"under {parent}" if parent else "at the top level"
    return f"valid keys {where}: {', '.join(keys)}" if keys else ""


# OmegaConf's message for a value outside an Enum-typed key's choices.
INVALID_CHOICE = re.compile(r"Invalid value '(.*)', expected one of \[.*\]")


def explain_composition_error(exc: BaseException) -> str:
    """Turn Hydra/OmegaConf's composition errors into one paragraph naming the key."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, value = exc.missing_cfg_file.partition("/")
        if group in GROUP_KEYS:
            return choice_text(group, value, CHOICE_KEYS[GROUP_KEYS[group]])
    cause = _omegaconf_cause(exc)
    if cause is not None and getattr(cause, "full_key", None):
        key = cause.full_key
        text = str(cause).splitlines()[0]
        if "not in" in text or "Key '" in text and "not" in text:
            hint = _valid_keys(key)
            return f"{key}: unknown key. {hint}. (To add a new key on purpose use +{key}=VALUE.)"
        invalid = INVALID_CHOICE.match(text)
        if invalid and key in CHOICE_KEYS:  # a choice key (an Enum in the schema) given another value
            return choice_text(key, invalid.group(1), CHOICE_KEYS[key])
        return f"{key}: {text}"
    first = str(exc).strip().splitlines()
    return " ".join(line.strip() for line in first if line.strip())


def compose(overrides: list[str], command: str = "train", *, resolve: bool = True,
            return_hydra_config: bool = False) -> DictConfig:
    """The config `overrides` compose, checked (ConfigError on any bad input): what every command
    runs, and what tests and scripts build runs from. `resolve=False` keeps interpolations as
    written (`${seed}`). `return_hydra_config` also keeps Hydra's own node, with `hydra.run.dir`, the
    directory a run of `command` writes, resolved once: its `${now:}` is read again, and may differ,
    each time it is read."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    setup_globals()  # Hydra's `now` resolver
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[*overrides, f"hydra.job.name={command}"],
                                return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the directory's name
        with open_dict(cfg), read_write(cfg.hydra):
            cfg.hydra.run.dir = str(cfg.hydra.run.dir)
            hydra_node = cfg.pop("hydra")
        if resolve:
            OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(explain_composition_error(exc)) from exc
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    validate(cfg)
    if return_hydra_config:
        with open_dict(cfg):
            cfg.hydra = hydra_node
    return cfg


HYDRA_PLAIN_VALUE = re.compile(r"^[\w./:-]+$")


def hydra_value(text: str) -> str:
    """`text` as a Hydra override value that reads back as exactly `text` (a path, say): quoted
    when it holds anything beyond word characters, `.`, `/`, `:` and `-`."""
    if HYDRA_PLAIN_VALUE.match(text):
        return text
    # In Hydra's quoted strings a backslash escapes a quote, so the backslashes right before a
    # quote, or at the end, are doubled.
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


@contextmanager
def hydra_command_line(argv: list[str], raise_errors: bool = True) -> Iterator[None]:
    """sys.argv as a `@hydra.main` app reads it, and with `raise_errors` HYDRA_FULL_ERROR=1, so
    that Hydra raises its own failures instead of printing a traceback and exiting 1; both are
    restored afterwards."""
    saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [saved_argv[0], *argv]
    if raise_errors:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error
