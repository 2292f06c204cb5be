"""Help text, bad input and device selection: every mistake is one clear paragraph, exit code 2,
no traceback, and no run directory left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.config.checks import ConfigError
from dropstudy.config.schema import CHOICE_KEYS, GROUP_KEYS
from dropstudy.engine.runtime import select_device

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), prog_name="dropstudy")


def test_help_lists_commands_and_examples():
    top = invoke("--help")
    assert top.exit_code == 0
    assert "train" in top.output and "study" in top.output
    for command in ("train", "study"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "Examples" in result.output and "experiment=cifar10" in result.output


def test_python_dash_m_runs_the_same_cli(dropstudy):
    result = dropstudy("--help")
    assert result.code == 0 and "study" in result.stdout


def test_cfg_prints_the_resolved_config(clean_env):
    result = invoke("train", "--cfg", "experiment=cifar10", "model.dropout=0.3")
    assert result.exit_code == 0
    assert "dropout: 0.3" in result.output and "name: cnn" in result.output


BAD_INPUTS = [
    (["trainer.epocs=5"], "trainer.epocs", "epochs"),
    (["model.dropout=1.0"], "model.dropout=1.0", "[0, 1)"),
    (["model.dropout=-0.1"], "model.dropout=-0.1", "[0, 1)"),
    (["model.dropout=[0.1,0.2]"], "model.dropout", "3 dropout sites"),
    (["experiment=cifar10", "model.dropout=[0.1,0.2,0.3]"], "model.dropout", "2 dropout sites"),
    (["model.dropout=abc"], "model.dropout", "[0, 1)"),
    (["trainer.epochs=0"], "trainer.epochs=0", "positive"),
    (["trainer.epochs=-3"], "trainer.epochs=-3", "positive"),
    (["trainer.epochs=many"], "trainer.epochs", "many"),
    (["trainer.eval_every=0"], "trainer.eval_every=0", "positive"),
    (["trainer.log_every=0"], "trainer.log_every=0", "positive"),
    (["device=gpu"], "device='gpu'", "auto, cpu, cuda, cuda:N or mps"),
    (["study.arms=[0.0,1.5]"], "study.arms[1]", "[0, 1)"),
    (["study.arms=???"], "study.arms", "needs a value"),
    (["--epochs", "3"], "--epochs", "key=value"),
    (["model.dropout_kind=spatial"], "model.dropout_kind=spatial", "experiment=cifar10"),
    (["experiment=cifar10", "model.dropout_kind=spatial"], "model.conv_dropout", "model.conv_dropout=0.1"),
    (["experiment=cifar10", "model.conv_dropout=[0.1,0.2]"], "model.conv_dropout", "3 dropout sites"),
    (["experiment=cifar10", "model.conv_dropout=1.5"], "model.conv_dropout=1.5", "[0, 1)"),
    (["model.conv_dropout=0.1"], "model.conv_dropout", "unknown key"),
    (["model.input_dropout=1.0"], "model.input_dropout=1.0", "[0, 1)"),
    (["model.dropout_schedule.epochs=0"], "model.dropout_schedule.epochs=0", "positive"),
    (["optim.max_norm=0"], "optim.max_norm=0", "positive"),
    (["optim.max_norm=big"], "optim.max_norm", "big"),
    (["eval.mc_samples=1"], "eval.mc_samples=1", "at least 2"),
    (["eval.mc_samples=-5"], "eval.mc_samples=-5", "at least 2"),
]


@pytest.mark.parametrize("command", ["train", "study"])
@pytest.mark.parametrize("args,key,allowed", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_message(clean_env, tmp_path: Path, command, args, key, allowed):
    result = invoke(command, *args)
    assert result.exit_code == 2, result.output
    assert key in result.output and allowed in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists(), "a rejected command must not create a run directory"


# Every choice key, and every config group whose options are a key's choices (experiment=, model=, ...).
CHOICES = {**{key: tuple(allowed) for key, allowed in CHOICE_KEYS.items()},
           **{group: tuple(CHOICE_KEYS[key]) for group, key in GROUP_KEYS.items()}}


@pytest.mark.parametrize("command", ["train", "study"])
@pytest.mark.parametrize("key", CHOICES)
def test_a_bad_choice_lists_the_declared_choices(clean_env, tmp_path: Path, command, key):
    """The message names the key and lists exactly the choices its StrEnum declares, in order."""
    result = invoke(command, f"{key}=bogus")
    assert result.exit_code == 2, result.output
    assert f"{key}='bogus': use one of {', '.join(CHOICES[key])}." in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists(), "a rejected command must not create a run directory"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_request_without_cuda_is_rejected(clean_env, tmp_path: Path, device):
    result = invoke("train", f"device={device}")
    assert result.exit_code == 2
    assert f"device={device}" in result.output and "CUDA is not available" in result.output
    assert "device=auto or device=cpu" in result.output
    assert not (tmp_path / "runs").exists()


def test_missing_cifar10_names_the_path_and_both_fixes(clean_env, tmp_path: Path):
    root = tmp_path / "nowhere"
    result = invoke("train", "experiment=cifar10", f"data.root={root}")
    assert result.exit_code == 2
    out = " ".join(result.output.split())  # rich may wrap long paths
    assert str(root) in out
    assert "data.download=true" in out and "data.root" in out and "data.synthetic=true" in out
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- device selection


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")


def test_explicit_devices(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        select_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=mps"):
        select_device("mps")
