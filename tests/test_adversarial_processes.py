"""Adversarial cases of processes and their records: what a user or the machine does to a
running dropstudy (a signal, a second signal, a full disk, a read-only HOME, a launcher's worker
processes, a value such as nan), and what must hold afterwards: the process exits, leaves no
process of its own behind, and every record (summary.json, study.json, sweep.json) says what
happened. Its sibling tests/store/test_adversarial_records.py holds the cases about what the records
and reports say of runs read back later; new cases of either kind go beside these.

Tests that signal a process wait for a condition (a checkpoint on disk, a line on stderr)
between signals, never for a fixed time: CI is a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK_REGRESSION, Child, wait_for

EXIT_IO_ERROR = 74
LONG_RUN = ["trainer.epochs=100000", "trainer.eval_every=1000", "trainer.log_every=1000",
            "trainer.checkpoint_every=50", "tracker.mode=disabled"]


def dropstudy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dropstudy", *args]


def session_processes(sid: int) -> list[str]:
    """Every live process of session `sid` (the test starts the CLI as a session leader, so its
    workers, their children and resource trackers stay in it even once re-parented)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if int(session) == sid and state != "Z":
            found.append(f"{stat.parent.name}: {cmdline}")
    return found


def assert_no_process_left(sid: int) -> None:
    """Nothing of the session is left once the CLI has exited (each given time to go)."""
    wait_for(lambda: not session_processes(sid), lambda: f"these processes to end: {session_processes(sid)}")


def start_session(args: list[str], cwd: Path, env: dict[str, str]) -> Child:
    """The CLI as the leader of its own session, which leaving a `with` block kills."""
    return Child(args, cwd, env, start_new_session=True)


def statuses(sweep_dir: Path) -> list[str]:
    return [job["status"] for job in json.loads((sweep_dir / "sweep.json").read_text())["jobs"]]


# --------------------------------------------------------------------------- 1: launchers' processes


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_sweep_on_a_process_launcher_exits_and_leaves_no_process(clean_env, tmp_path, launcher):
    """loky's executor thread ends only in an exit handler: exiting must not wait for it first."""
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    with start_session(["sweep", "model.dropout=0,0.5", "trainer.epochs=3", "tracker.mode=disabled",
                        f"hydra/launcher={launcher}", *extra, "hydra.sweep.dir=sw"], tmp_path, clean_env) as proc:
        result = proc.finish(timeout=300)
        assert result.code == 0, result.output
        assert statuses(tmp_path / "sw") == ["finished", "finished"]
        assert_no_process_left(proc.pid)


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [False, True], ids=["sigterm-to-the-sweep", "ctrl-c-to-the-group"])
def test_a_signal_to_a_joblib_sweep_stops_its_workers_with_checkpoints(clean_env, tmp_path, to_group):
    """`kill PID` of the sweep (SIGTERM) reaches the jobs in its worker processes, as Ctrl-C in a
    terminal (SIGINT to the whole process group) does: each checkpoints and says interrupted, the
    queued jobs do not start, and no worker or resource tracker is left. After `kill PID` the
    workers trained on, orphaned."""
    sweep = tmp_path / "sw"
    with start_session(["sweep", "model.dropout=0,0.5", "seed=0,1", *LONG_RUN, "hydra/launcher=joblib",
                        "hydra.launcher.n_jobs=2", "hydra.sweep.dir=sw"], tmp_path, clean_env) as proc:
        proc.wait_for(lambda: all((sweep / str(i) / "checkpoints" / "last.pt").is_file() for i in (0, 1)),
                      "both workers' first checkpoint", timeout=300)
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        result = proc.finish(timeout=300)
        assert result.code == (130 if to_group else 143), result.output
        assert statuses(sweep) == ["interrupted"] * 4, result.output
        for i in (2, 3):  # queued behind the interrupted ones: never started, and resume starts them
            summary = json.loads((sweep / str(i) / "summary.json").read_text())
            assert summary["epoch"] == 0 and "before this job started" in summary["reason"]
        assert "Traceback" not in result.stderr, result.stderr
        assert_no_process_left(proc.pid)


# --------------------------------------------------------------------------- 8: nan and inf


def invoke(*args: str):
    from typer.testing import CliRunner

    from dropstudy.cli import app

    return CliRunner().invoke(app, list(args), prog_name="dropstudy")


@pytest.mark.parametrize("override", [
    "optim.lr=nan", "optim.lr=inf", "optim.weight_decay=nan", "optim.weight_decay=inf", "optim.momentum=nan",
    "optim.momentum=-1", "optim.max_norm=nan", "optim.max_norm=inf", "data.slope=nan", "data.train_noise=inf",
    "data.test_noise=nan",
])
def test_a_float_key_refuses_nan_and_inf_naming_the_key(clean_env, tmp_path, override):
    """nan passes `lr <= 0`: it trained and was reported as diverged. Refused before anything is written."""
    result = invoke("train", *QUICK_REGRESSION, override, "hydra.run.dir=run")
    key = override.split("=")[0]
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {key}="), result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_a_sweep_refuses_nan_in_any_grid_point(clean_env, tmp_path):
    result = invoke("sweep", "optim.lr=0.01,nan", "trainer.epochs=2", "hydra.sweep.dir=sw")
    assert result.exit_code == 2 and "sweep job 1" in result.output and "optim.lr=nan" in result.output, result.output
    assert not (tmp_path / "sw").exists()


# --------------------------------------------------------------------------- 9: printed commands


def test_a_printed_command_for_a_dir_starting_with_a_dash_pastes_as_it_is(dropstudy, tmp_path):
    """`dropstudy resume -r` reads -r as an option; the command printed must say ./-r."""
    import shlex

    first = dropstudy("train", "trainer.epochs=2", "tracker.mode=disabled", "hydra.run.dir=-r")
    assert first.code == 0, first.output
    again = dropstudy("train", "trainer.epochs=2", "tracker.mode=disabled", "hydra.run.dir=-r")
    assert again.code == 2 and "To continue it: dropstudy resume ./-r;" in again.output, again.output
    pasted = dropstudy(*shlex.split("dropstudy resume ./-r")[1:])
    assert pasted.code == 2 and "finished already" in pasted.output, pasted.output
    assert "To train it again use: dropstudy rerun ./-r" in pasted.output, pasted.output


# --------------------------------------------------------------------------- 12: a read-only HOME


def test_a_read_only_home_costs_one_line_and_the_run_still_works(clean_env, tmp_path):
    """W&B's service logged to the console and matplotlib warned twice when they could not write
    under HOME; the run worked, under 19 lines of their noise."""
    import re

    from test_failures import run_in_read_only, skip_without_read_only_mounts

    skip_without_read_only_mounts()
    home = Path(clean_env["HOME"])
    env = {k: v for k, v in clean_env.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    proc = run_in_read_only(home, tmp_path, env, "train", "trainer.epochs=3", "tracker.mode=offline", "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    noise = [line for line in proc.stderr.splitlines()
             if "takes no writes" not in line
             and (re.match(r"\d{4}/\d\d/\d\d ", line) or "matplotlib" in line.lower() or "mkdir" in line)]
    assert noise == [], proc.stderr
    notes = [line for line in proc.stderr.splitlines() if str(home) in line]
    assert len(notes) == 1 and "W&B and matplotlib keep their settings and caches in" in notes[0], proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")), "the W&B run was still recorded"


# --------------------------------------------------------------------------- 6, 7: a full disk


def on_a_full_disk(tmp_path: Path, env: dict[str, str], *args: str, size: str = "256k") -> subprocess.CompletedProcess:
    """`dropstudy ARGS` with its output under tmp_path/disk, a tmpfs of `size` in a private mount
    namespace, copied to tmp_path/out afterwards (the tmpfs vanishes with the namespace)."""
    from test_failures import mount_namespace_reason

    reason = mount_namespace_reason()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join(dropstudy_cmd(*args))
    script = (f"mount -t tmpfs -o size={size} tmpfs '{disk}' && cd '{disk}' && {command}; code=$?; "
              f"cp -a '{disk}' '{tmp_path / 'out'}'; exit $code")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False, timeout=300)


def test_a_study_on_a_full_disk_says_failed_and_why_in_study_json(clean_env, tmp_path):
    from test_failures import assert_one_message

    proc = on_a_full_disk(tmp_path, clean_env, "study", *QUICK_REGRESSION, "tracker.mode=disabled",
                          "hydra.run.dir=st")
    assert_one_message(proc, "cannot write checkpoints/last.pt", "No space left on device")
    record = json.loads((tmp_path / "out" / "st" / "study.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["reason"], record
    assert [arm["status"] for arm in record["arms"]] == ["failed", "not run"], record


def test_a_batched_sweep_on_a_full_disk_exits_74_and_each_member_names_its_own_file(clean_env, tmp_path):
    """It exited 1 with tracebacks, and every member's reason named member 0's checkpoint."""
    from test_failures import assert_one_message

    proc = on_a_full_disk(tmp_path, clean_env, "sweep", "model.dropout=0,0.5", "seed=0,1", *QUICK_REGRESSION,
                          "tracker.mode=disabled", "hydra.sweep.dir=sw")
    assert_one_message(proc, "cannot write checkpoints/last.pt in sw/0", "No space left on device")
    record = json.loads((tmp_path / "out" / "sw" / "sweep.json").read_text())
    assert record["mode"] == "batched" and "No space left on device" in record["error"], record
    for job in record["jobs"]:
        assert job["status"] == "failed", job
        assert job["reason"].startswith(f"cannot write checkpoints/last.pt in sw/{job['num']}:"), job
        assert "No space left on device" in job["reason"], job


# --------------------------------------------------------------------------- 11: a second Ctrl-C


@pytest.mark.slow  # a minute of a long run on a loaded machine; `make test-slow` runs it in CI
def test_a_second_ctrl_c_exits_at_once_with_summary_json_saying_interrupted(clean_env, tmp_path):
    """The second signal's immediate exit left summary.json saying running (the run was resumable)."""
    import torch

    run = tmp_path / "run"
    with Child(["train", *LONG_RUN, "hydra.run.dir=run"], tmp_path, clean_env) as proc:
        proc.wait_for(lambda: (run / "checkpoints" / "last.pt").is_file(), "the first checkpoint", timeout=300)
        proc.send_signal(signal.SIGINT)
        proc.wait_for_line("SIGINT again exits at once")
        proc.send_signal(signal.SIGINT)
        result = proc.finish()
    output = result.output
    assert result.code == 130, output
    summary = json.loads((run / "summary.json").read_text())
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert summary["status"] == "interrupted" and summary["epoch"] == checkpoint["epoch"], (summary, output)
    assert summary["reason"].startswith("SIGINT during epoch"), summary


# The run's own code sends both signals: the first at epoch 60, the second the moment the first
# one's answer is logged, the earliest a user can press Ctrl-C again.
SIGINT_AS_THE_ANSWER_IS_LOGGED = """
import os, signal, sys
from dropstudy.engine import loop as engine
from dropstudy.engine.backend import Backend as Single
from dropstudy.cli import main
info, set_epoch = engine.log.info, Single.set_epoch

def answered(message, *args, **kwargs):
    info(message, *args, **kwargs)
    if "again exits at once" in message:
        os.kill(os.getpid(), signal.SIGINT)

def interrupting(self, epoch):
    if epoch == 60:
        os.kill(os.getpid(), signal.SIGINT)
    return set_epoch(self, epoch)

engine.log.info, Single.set_epoch = answered, interrupting
sys.argv[0] = "dropstudy"
main()
"""


def test_a_second_ctrl_c_as_soon_as_the_first_is_answered_leaves_summary_json_interrupted(clean_env, tmp_path):
    """The slow test above failed once in four runs on a loaded machine: summary.json said running."""
    import torch

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SIGINT_AS_THE_ANSWER_IS_LOGGED, "train", *LONG_RUN,
                           "hydra.run.dir=run"], cwd=tmp_path, env=clean_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 130 and "SIGINT again: exiting now" in proc.stderr, proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert summary["status"] == "interrupted" and summary["epoch"] == checkpoint["epoch"] == 50, summary


# --------------------------------------------------------------------------- 10: a batched sweep resumed


def test_resuming_a_batched_sweep_says_which_members_continued_from_which_epoch(
        clean_env, tmp_path, monkeypatch, own_signal_handlers):
    """It printed '4 jobs, 4 kept' and recorded {"jobs": []}, though all four were continued."""
    from dropstudy.engine.backend import Backend

    grid = ["model.dropout=0.2,0.5", "seed=0,1", "trainer.epochs=40", "trainer.eval_every=10",
            "model.hidden=[16,16]", "tracker.mode=disabled", "hydra.sweep.dir=sw"]
    real_set_epoch = Backend.set_epoch

    def set_epoch(self, epoch):
        if epoch == 17:  # sent from inside the loop: the same epoch on any machine
            os.kill(os.getpid(), signal.SIGTERM)
        return real_set_epoch(self, epoch)

    with monkeypatch.context() as mp:
        mp.setattr(Backend, "set_epoch", set_epoch)
        assert invoke("sweep", *grid).exit_code == 143
    resumed = invoke("resume", "sw")
    assert resumed.exit_code == 0, resumed.output
    assert "4 jobs, 4 continued from checkpoints (batched), 0 kept" in resumed.output, resumed.output
    for num, setting in enumerate(["model.dropout=0.2 seed=0", "model.dropout=0.2 seed=1",
                                   "model.dropout=0.5 seed=0", "model.dropout=0.5 seed=1"]):
        assert f"member {num} ({setting}): interrupted, resumed after epoch 17" in resumed.output, resumed.output
    record = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert record["resumed"][-1]["continued"] == [{"num": num, "from_epoch": 17} for num in range(4)], record
