"""`dropstudy sweep --wandb`: a W&B sweep file whose agent runs `dropstudy train`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dropstudy.config.checks import ConfigError
from dropstudy.config.compose import explain_composition_error
from dropstudy.config.hydra_internals import is_hydra_override



WANDB_METHODS = ("grid", "random", "bayes")


# What a W&B agent runs for each point: `dropstudy train key=value ...`, Hydra overrides as-is.
AGENT_COMMAND = ["${env}", "${interpreter}", "-m", "dropstudy", "train", "${args_no_hyphens}"]


def _wandb_value(value: Any, text: str) -> Any:
    """Numbers stay numbers (bayes needs them); anything else is passed as its Hydra text, which
    the agent writes back verbatim as key=TEXT."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return text


def wandb_sweep_config(overrides: list[str], method: str, metric: str,
                       goal: str) -> tuple[dict[str, Any], list[str]]:
    """A W&B sweep config for `overrides` (its name, project and entity come from the composed
    grid: the caller adds them), and the overrides that check its grid (and place the file:
    hydra.sweep.dir). Comma lists, range() and choice() become `values`, interval() a
    uniform `min`/`max` (random, bayes), everything else a fixed `value`; `~key` deletions go
    into the command itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType

    if method not in WANDB_METHODS:
        raise ConfigError(f"--method {method}: use one of {', '.join(WANDB_METHODS)}.")
    if goal not in ("minimize", "maximize"):
        raise ConfigError(f"--goal {goal}: use minimize or maximize.")
    parser = OverridesParser.create()
    parameters: dict[str, Any] = {}
    command = list(AGENT_COMMAND)
    checks: list[str] = []
    for arg in overrides:
        if arg.startswith("hydra.sweep.dir="):
            checks.append(arg)  # where the sweep config is written, not a parameter
            continue
        if is_hydra_override(arg):
            raise ConfigError(f"{arg}: W&B agents run `dropstudy train` on their own machines; Hydra's "
                              "launcher and sweep settings do not apply there. Leave it out of --wandb.")
        try:
            override = parser.parse_override(arg)
        except Exception as exc:
            raise ConfigError(f"{arg}: {explain_composition_error(exc)}") from exc
        key = override.get_key_element()
        if override.type == OverrideType.DEL:
            command.insert(-1, arg)
            checks.append(arg)
        elif override.value_type == ValueType.INTERVAL_SWEEP:
            if method == "grid":
                raise ConfigError(f"{arg}: --method grid needs a list of values (a,b,c, range() or choice()); "
                                  "interval() needs --method random or bayes.")
            interval = override.value()
            parameters[key] = {"distribution": "uniform", "min": interval.start, "max": interval.end}
            checks.append(f"{key}={interval.start},{interval.end}")
        elif override.is_discrete_sweep():
            values = list(override.sweep_iterator())
            texts = list(override.sweep_string_iterator())
            parameters[key] = {"values": [_wandb_value(v, t) for v, t in zip(values, texts)]}
            checks.append(arg)
        else:
            parameters[key] = {"value": _wandb_value(override.value(), override.get_value_element_as_str())}
            checks.append(arg)
    if not any("values" in p or "min" in p for p in parameters.values()):
        raise ConfigError("--wandb: nothing to sweep; give at least one key a list of values, "
                          "e.g. model.dropout=0,0.25,0.5 seed=range(0,5).")
    config: dict[str, Any] = {
        "program": "dropstudy",  # the agent requires the key; the command below is what runs
        "method": method,
        "metric": {"name": metric, "goal": goal},
        "parameters": parameters,
        "command": command,
    }
    return config, checks


def write_wandb_sweep(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
