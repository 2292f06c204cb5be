"""Start-up: `--help` and every bad-input error are answered without importing torch, wandb or
matplotlib (seconds of imports a user would wait for to read one paragraph; each case runs the
real CLI in a fresh interpreter, then lists the heavy modules that got imported); and W&B's
start runs beside the run's set-up instead of before it, losing nothing logged meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import QUICK_REGRESSION
from recording_tracker import RecordingTracker
from wandb_offline import load_run

from dropstudy.cli import app

HEAVY = ("torch", "wandb", "matplotlib")

# The CLI as `dropstudy ARGS` runs it (main() ends the process, so the probe calls the app it
# runs), then one JSON line on stderr: the exit code and the heavy modules loaded.
PROBE = """
import json, sys
from dropstudy.cli import app
try:
    app(sys.argv[1:], prog_name="dropstudy")
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def probe(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    *text, last = proc.stderr.rstrip("\n").split("\n")
    report = json.loads(last)
    return report["code"], report["heavy"], proc.stdout + "\n".join(text)


COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


@pytest.mark.parametrize("args", [("--help",), *((c, "--help") for c in COMMANDS)], ids=" ".join)
def test_help_imports_nothing_heavy(clean_env, tmp_path, args):
    code, heavy, output = probe(clean_env, tmp_path, *args)
    assert code == 0 and "Usage" in output
    assert heavy == []


def test_printing_the_config_imports_nothing_heavy(clean_env, tmp_path):
    """`--cfg` only composes: device auto and cpu resolve without asking torch."""
    code, heavy, output = probe(clean_env, tmp_path, "study", "--cfg", "device=cpu")
    assert code == 0 and "experiment: regression" in output and "device: cpu" in output
    assert heavy == []


BAD_INPUT = {
    "unknown key": (("train", "model.nope=1"), "model.nope: unknown key"),
    "out of range": (("train", "model.dropout=1.0"), "model.dropout=1.0"),
    "bad choice": (("study", "optim.name=adamw"), "optim.name='adamw'"),
    "study check": (("study", "model.dropout_kind=none"), "every arm of study.arms"),
    "sweep point": (("sweep", "model.dropout=0,1.5"), "model.dropout=1.5"),
    "no such experiment": (("train", "experiment=mnist"), "experiment='mnist': use one of regression, cifar10"),
    "missing data": (("train", "experiment=cifar10", "data.root=missing"), "CIFAR-10 was not found"),
    "resume: missing dir": (("resume", "missing"), "missing: no such directory"),
    "rerun: missing dir": (("rerun", "missing"), "missing: no such directory"),
    "report: missing dir": (("report", "missing"), "missing: no such directory"),
    "demo: no such demo": (("demo", "nope"), "no demonstration called 'nope'"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=str)
def test_bad_input_is_refused_without_heavy_imports(clean_env, tmp_path, case):
    args, message = BAD_INPUT[case]
    code, heavy, output = probe(clean_env, tmp_path, *args)
    assert code == 2 and message in output
    assert heavy == []


def test_the_probe_sees_torch_where_a_check_needs_it(clean_env, tmp_path):
    """Whether a CUDA device exists only torch can say: the control that the probe would notice."""
    code, heavy, output = probe(clean_env, tmp_path, "train", "device=cuda:99")
    assert code == 2 and "device=cuda:99" in output
    assert "torch" in heavy


# --------------------------------------------------------------------------- W&B off the critical path


def test_wandb_warms_up_while_the_run_sets_up(clean_env, tmp_path, monkeypatch):
    """W&B's import and service start run in their own thread from the command's start, while
    the run loads its data, instead of in line before it."""
    import wandb
    from typer.testing import CliRunner

    from dropstudy.runs import execute
    from dropstudy.tracking import wandb_run as tracking

    events: list[tuple[str, str]] = []
    real_warm_up, real_setup, real_load = tracking._import_and_start_wandb, wandb.setup, execute.load_dataset

    def warm_up():
        events.append(("warm-up", threading.current_thread().name))
        real_warm_up()

    def setup(*args, **kwargs):
        events.append(("wandb.setup", threading.current_thread().name))
        return real_setup(*args, **kwargs)

    def load_dataset(*args, **kwargs):
        events.append(("load_dataset", threading.current_thread().name))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(tracking, "_import_and_start_wandb", warm_up)
    monkeypatch.setattr(wandb, "setup", setup)
    monkeypatch.setattr(execute, "load_dataset", load_dataset)
    monkeypatch.setattr(tracking, "_warm_up", None)
    result = CliRunner().invoke(app, ["train", *QUICK_REGRESSION, "tracker.mode=offline", "hydra.run.dir=run"],
                                prog_name="dropstudy")
    assert result.exit_code == 0, result.output
    assert events[0] == ("warm-up", "dropstudy-wandb-warm-up"), "started before the run loads its data"
    assert ("wandb.setup", "dropstudy-wandb-warm-up") in events and ("load_dataset", "MainThread") in events
    assert load_run(tmp_path / "run").scalars("train/loss"), "the run still reached W&B"


def test_a_run_trains_while_wandb_starts(clean_env, tmp_path, monkeypatch):
    """Nothing in a run's set-up waits for W&B's start (its sync command is read at the end): the
    tracker below comes up only once training has begun, and the run still reaches it."""
    from typer.testing import CliRunner

    from dropstudy.engine.loop import Engine
    from dropstudy.runs import execute

    training, seen = threading.Event(), []
    real_make_tracker, real_run = execute.make_tracker, Engine.run

    def make_tracker(*args, **kwargs):
        seen.append(training.wait(timeout=20))
        return real_make_tracker(*args, **kwargs)

    def run(self):
        training.set()
        return real_run(self)

    monkeypatch.setattr(execute, "make_tracker", make_tracker)
    monkeypatch.setattr(Engine, "run", run)
    result = CliRunner().invoke(app, ["train", *QUICK_REGRESSION, "tracker.mode=offline", "hydra.run.dir=run"],
                                prog_name="dropstudy")
    assert result.exit_code == 0, result.output
    assert seen == [True], "the set-up waited for W&B's start"
    assert load_run(tmp_path / "run").scalars("train/loss"), "the run still reached W&B"


def test_calls_made_while_wandb_starts_reach_it_in_order_once_it_is_up():
    """Nothing waits for W&B's start but what needs the run itself, and nothing logged meanwhile
    is lost: rows, histograms (as they were when logged) and the summary arrive in order."""
    import torch

    from dropstudy.tracking.wandb_run import BackgroundTracker

    release = threading.Event()
    recorder = RecordingTracker()

    def start():
        release.wait(timeout=30)
        return recorder

    tracker = BackgroundTracker(start)
    weight = torch.ones(3)
    tracker.log({"epoch": 1, "train/loss": 1.0}, step=0)
    tracker.log_histograms({"parameters/w": weight}, step=1)
    weight.mul_(5)  # training goes on and changes the tensor before W&B is up
    tracker.log({"epoch": 2, "train/loss": 0.5}, step=1)
    tracker.set_summary({"status": "finished"})
    assert not release.is_set() and recorder.calls == [], "the calls returned while W&B was starting"
    release.set()
    tracker.finish()
    assert [name for name, _ in recorder.calls] == ["log", "log_histograms", "log", "set_summary", "finish"]
    assert recorder.steps == [0, 1] and recorder.rows[1]["train/loss"] == 0.5
    assert recorder.of("log_histograms")[0]["tensors"]["parameters/w"].tolist() == [1.0, 1.0, 1.0]
    assert tracker.run_id == recorder.run_id


def test_a_background_start_that_fails_leaves_training_without_wandb(caplog):
    from dropstudy.tracking.wandb_run import BackgroundTracker

    def start():
        raise RuntimeError("no W&B here")

    tracker = BackgroundTracker(start)
    tracker.log({"epoch": 1}, step=0)
    tracker.finish()
    assert tracker.run_id is None and tracker.sync_command is None
    assert any("W&B could not start (RuntimeError: no W&B here)" in r.getMessage() for r in caplog.records)


DETERMINISM_PROBE = """
import json, sys
from omegaconf import OmegaConf
from dropstudy.engine.runtime import set_up_process
import torch
compiled = sys.argv[1] == "compile"
set_up_process(OmegaConf.create({"device": "cpu", "deterministic": True,
                                 "trainer": {"threads": 1, "compile": compiled}}))
inductor = sys.modules.get("torch._inductor.config")
print(json.dumps({"on": torch.are_deterministic_algorithms_enabled(),
                  "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                  "inductor_loaded": inductor is not None,
                  "inductor_deterministic": getattr(inductor, "deterministic", None)}))
"""


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_deterministic_mode_without_loading_the_compiler(clean_env, tmp_path, compiled):
    """deterministic=true turns torch's deterministic algorithms on (warnings only) in every run;
    the inductor compiler (1.5 s to import) is loaded, and told, only when trainer.compile is on.
    If torch drops the private setter this relies on, the public call takes over and the eager
    case fails here on `inductor_loaded`, to be looked at."""
    proc = subprocess.run([sys.executable, "-c", DETERMINISM_PROBE, "compile" if compiled else "eager"], cwd=tmp_path,
                          env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["on"] and state["warn_only"]
    assert state["inductor_loaded"] == compiled
    if compiled:
        assert state["inductor_deterministic"] is True
