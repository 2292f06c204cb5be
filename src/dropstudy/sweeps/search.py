"""Optuna searches: `dropstudy sweep hydra/sweeper=optuna 'model.dropout=interval(0,0.8)'`.

hydra-optuna-sweeper picks the trials and launches them on any launcher; dropstudy checks the
search before it starts (`plan_search`: the searched ranges' ends as grid points, the sweeper's
config, `sweep.objective` and the direction it implies), each trial's job returns its run's
objective (`objective_value`, from summary.json), and the outcome is read back from the run
dirs Hydra numbered (`trial_jobs`), ranked, with the best trial's parameters (`best_trial`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dropstudy.config.checks import ConfigError, objective_direction
from dropstudy.config.compose import explain_composition_error
from dropstudy.config.hydra_internals import hydra_instance, is_hydra_override
from dropstudy.sweeps.plan import (
    JobOutcome,
    SearchSpec,
    SweepPlan,
    check_launcher,
    check_sweeper,
    hydra_choice,
    plan_grid,
    sweep_dir_override,
)


def plan_sweep(overrides: list[str], new: bool = True) -> SweepPlan:
    """The plan of any sweep `overrides` describe: a grid (Hydra's basic sweeper), or an Optuna
    search (hydra/sweeper=optuna) whose ends are checked like a grid's points."""
    check_launcher(hydra_choice("hydra/launcher", overrides))
    sweeper = hydra_choice("hydra/sweeper", overrides)
    check_sweeper(sweeper)
    return plan_grid(overrides, new) if sweeper == "basic" else plan_search(overrides, sweeper, new)


def plan_search(overrides: list[str], sweeper: str, new: bool = True) -> SweepPlan:
    """An Optuna search, checked before it starts: each searched key at the ends of its range
    (an interval's lower end and the largest value below its upper end, every value of a
    choice) is composed and validated like a grid point; then the sweeper's own config and
    the objective, whose name sets the direction Optuna is told."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    space: dict[str, str] = {}
    checks: list[str] = []
    own = [a for a in overrides if a.startswith(("hydra/sweeper=", "hydra.sweeper."))]
    for arg in overrides:
        if arg in own:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception as exc:
            raise ConfigError(f"{arg}: {explain_composition_error(exc)}") from exc
        if is_hydra_override(arg) or not override.is_sweep_override():
            checks.append(arg)
            continue
        key = override.get_key_element()
        space[key] = arg.split("=", 1)[1]
        if override.value_type == ValueType.INTERVAL_SWEEP:
            interval = override.value()
            high = interval.end if isinstance(interval.end, int) else math.nextafter(interval.end, interval.start)
            checks.append(f"{key}={interval.start},{high}")
        else:
            checks.append(arg)
    if not space:
        raise ConfigError(f"hydra/sweeper={sweeper}: nothing to search; give at least one key a range or choices, "
                          "e.g. 'model.dropout=interval(0,0.8)' or 'optim.lr=tag(log,interval(1e-4,1e-1))' or "
                          "trainer.batch_size=choice(32,64).")
    checked = plan_grid(checks, new=new)
    argv = [*overrides, "hydra.job.name=sweep", sweep_dir_override(str(checked.sweep_dir))]
    objective = str(checked.jobs[0].cfg.sweep.objective)
    direction = objective_direction(objective)
    given = [a.split("=", 1)[1] for a in own if a.startswith("hydra.sweeper.direction=")]
    if given and given[-1] != direction:
        raise ConfigError(f"hydra.sweeper.direction={given[-1]}: sweep.objective={objective} is "
                          f"{direction}d; leave hydra.sweeper.direction out (dropstudy sets it from the objective).")
    argv.append(f"hydra.sweeper.direction={direction}")
    if not any(a.startswith("hydra.sweeper.max_failure_rate=") for a in own):
        # A trial that diverges is an answer about its region, not a reason to stop the search.
        argv.append("hydra.sweeper.max_failure_rate=1.0")
    try:
        master = hydra_instance().config_loader.load_configuration(config_name="config", overrides=argv,
                                                             run_mode=RunMode.MULTIRUN)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(explain_composition_error(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    n_trials = master.hydra.sweeper.n_trials
    if n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={n_trials}: a search needs at least 1 trial.")
    if master.hydra.sweeper.n_jobs < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs={master.hydra.sweeper.n_jobs}: the trials launched at once "
                          "must be at least 1.")
    search = SearchSpec(sweeper, objective, direction, n_trials, space)
    return SweepPlan(checked.sweep_dir, checked.launcher, checked.group, argv, checked.jobs, master, search)


class TrialFailed(Exception):
    """A search's trial ended without a value of its objective (it diverged or failed)."""


def objective_value(summary: dict[str, Any], objective: str, status: str | None = None) -> float:
    """A run's objective: the metric's best value over its evaluations, else its final value
    (test metrics, calibration errors); NaN for a run that did not finish."""
    if (status or summary.get("status")) != "finished":
        return float("nan")
    for part in ("best", "final", "calibration"):
        value = summary.get(part, {}).get(objective)
        if isinstance(value, (int, float)):
            return float(value)
    return float("nan")


def trial_jobs(sweep_dir: Path) -> list[tuple[int, list[str], Path]]:
    """The trials a search ran, as Hydra numbered their run dirs: (number, overrides, run dir)."""
    trials = []
    for run_dir in sweep_dir.iterdir() if sweep_dir.is_dir() else ():
        saved = run_dir / ".hydra" / "overrides.yaml"
        if run_dir.name.isdigit() and saved.is_file():
            trials.append((int(run_dir.name), [str(o) for o in OmegaConf.load(saved)], run_dir))
    return sorted(trials)


def best_trial(plan: SweepPlan, outcomes: list[JobOutcome]) -> dict[str, Any] | None:
    """The best trial of a search: its parameters (the searched keys' values), objective, run dir."""
    best = next((o for o in outcomes if o.rank == 1), None)
    if best is None:
        return None
    params = {}
    for override in best.overrides:
        key, _, value = override.partition("=")
        if key in plan.search.space:
            params[key] = yaml_value(value)
    return {"objective": plan.search.objective, "direction": plan.search.direction, "value": best.objective,
            "params": params, "trial": best.num, "overrides": best.overrides, "run_dir": str(best.run_dir)}


def yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
