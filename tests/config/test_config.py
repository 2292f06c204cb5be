"""The config's declarations: each choice list once (the schema's StrEnums, which conf/'s files and
the checks of saved configs follow), and each experiment's study arms in its own overlay."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.config.checks import ConfigError, validate
from dropstudy.config.compose import compose, conf_dir
from dropstudy.config.schema import CHOICE_KEYS, GROUP_KEYS


def test_choice_keys_are_found_in_the_schema_nested_ones_included():
    assert {"experiment", "model.name", "model.dropout_kind", "model.dropout_schedule.kind", "data.name",
            "optim.name", "trainer.on_nan", "trainer.amp", "tracker.mode", "tracker.watch",
            "sweep.member_execution"} == set(CHOICE_KEYS)


@pytest.mark.parametrize("group", GROUP_KEYS)
def test_each_config_group_has_one_file_per_declared_choice(group):
    files = sorted(path.stem for path in (conf_dir() / group).glob("*.yaml"))
    assert files == sorted(CHOICE_KEYS[GROUP_KEYS[group]])


@pytest.mark.parametrize("key", CHOICE_KEYS)
def test_a_saved_config_with_a_bad_choice_is_refused_like_new_input(key):
    """resume and rerun check a saved config, plain YAML without the schema's types, with the
    same message as a bad override."""
    saved = OmegaConf.create(OmegaConf.to_yaml(compose([])))
    OmegaConf.update(saved, key, "bogus")
    with pytest.raises(ConfigError) as refused:
        validate(saved)
    assert str(refused.value) == f"{key}='bogus': use one of {', '.join(CHOICE_KEYS[key])}."


@pytest.mark.parametrize("experiment, arms", [("regression", [0.0, 0.5]), ("cifar10", [0.0, 0.25])])
def test_study_trains_the_arms_its_experiment_sets(clean_env, experiment, arms):
    result = CliRunner().invoke(app, ["study", "--cfg", f"experiment={experiment}"], prog_name="dropstudy")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["study"]["arms"] == arms


def test_compose_keeps_interpolations_unresolved_on_request():
    assert OmegaConf.to_container(compose([], resolve=False).data)["seed"] == "${seed}"
    assert compose(["seed=3"]).data.seed == 3
