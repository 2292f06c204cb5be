"""Every use of Hydra's private API, in one place, checked against the hydra-core it was written
for (1.3.x). `dropstudy sweep` plans a multirun exactly as Hydra's basic sweeper and launchers
will run it, before launching anything; Hydra has no public API for that, so these few calls
reach into `hydra._internal`. A Hydra upgrade that moves them fails here, loudly, with the
version named (and tests/engine/test_loop.py fails on it), instead of somewhere in a sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra

from dropstudy.config.checks import ConfigError
from dropstudy.config.compose import conf_dir

SUPPORTED = "1.3."


class UnsupportedHydra(ConfigError):
    """The installed hydra-core is not the one these internals were written against."""


def check_version(version: str = hydra.__version__) -> None:
    if not version.startswith(SUPPORTED):
        raise UnsupportedHydra(
            f"hydra-core {version} is installed, but dropstudy's sweep planning uses Hydra internals written "
            f"for hydra-core {SUPPORTED}x (src/dropstudy/config/hydra_internals.py); install hydra-core>=1.3.2,<1.4."
        )


def main_hydra(task_name: str, conf_dir: Path) -> Any:
    """A Hydra instance over `conf_dir`, as @hydra.main makes one (its config_loader composes)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path

    check_version()
    return Hydra.create_main_hydra2(task_name=task_name, config_search_path=create_config_search_path(str(conf_dir)))


def split_sweep_arguments(parsed_overrides: list[Any]) -> list[list[list[str]]]:
    """The job list of the basic sweeper: batches of jobs, each its list of overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper.split_arguments(parsed_overrides, None)


def apply_overrides(config_loader: Any, overrides: list[Any], cfg: Any) -> None:
    """Set parsed value overrides on a composed config as Hydra's composition sets them."""
    config_loader._apply_overrides_to_config(overrides, cfg)


def check_api() -> None:
    """The private names above still exist with the shape used here; UnsupportedHydra if not."""
    check_version()
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra._internal.hydra import Hydra
        from hydra._internal.utils import create_config_search_path  # noqa: F401
    except ImportError as exc:
        raise UnsupportedHydra(f"hydra-core {hydra.__version__}: {exc}") from exc
    for owner, name in ((Hydra, "create_main_hydra2"), (BasicSweeper, "split_arguments"),
                        (ConfigLoaderImpl, "_apply_overrides_to_config"), (ConfigLoaderImpl, "load_configuration"),
                        (ConfigLoaderImpl, "load_sweep_config")):
        if not callable(getattr(owner, name, None)):
            raise UnsupportedHydra(f"hydra-core {hydra.__version__}: {owner.__name__}.{name} is gone")



def hydra_instance():
    """A fresh Hydra set up on dropstudy's conf/, for the sweeper's own planning."""
    GlobalHydra.instance().clear()
    return main_hydra("sweep", conf_dir())


def is_hydra_override(arg: str) -> bool:
    """Whether an override sets Hydra itself (hydra/..., hydra.*) rather than the run's config."""
    return arg.lstrip("+~").startswith(("hydra/", "hydra."))
