"""One run, one directory, one writer: train, study, sweep and rerun refuse a directory that
already holds a run (and change nothing in it), a second writer of a directory exits 2 naming
the first, default directory names differ even within one second, and every command line the
tool prints pastes into a shell."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from glob import glob
from pathlib import Path

import pytest
from conftest import QUICK_REGRESSION, SWEEP_GRID, Child, clean_environment, read_jsonl
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.store.rundir import RunDirClaimError, claim_run_dir

SPACED = "my runs/a b"  # a run directory a shell splits unless the command quotes it
QUIET = ["tracker.mode=disabled"]


def cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dropstudy", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file and folder under `directory` (hidden ones too), with each file's SHA-256."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), directory) + "/"] = "dir"
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def one_line(text: str) -> str:
    return " ".join(text.split())


runner = CliRunner()


def invoke(*args: str):
    """The CLI in this process: a refusal happens before any training, so no subprocess is needed."""
    return runner.invoke(app, list(args), prog_name="dropstudy")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished regression run in a directory whose name has spaces, W&B offline."""
    tmp = tmp_path_factory.mktemp("owned")
    env = clean_environment(tmp)
    result = cli(tmp, env, "train", *QUICK_REGRESSION, "tracker.mode=offline", f"hydra.run.dir={SPACED}")
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, result


# --------------------------------------------------------------------------- refused reuse


def test_train_into_a_finished_run_is_refused_and_changes_nothing(finished_run, clean_env, monkeypatch):
    tmp, _ = finished_run
    monkeypatch.chdir(tmp)
    before = snapshot(tmp / SPACED)
    result = invoke("train", *QUICK_REGRESSION, *QUIET, "seed=1", f"hydra.run.dir={SPACED}")
    assert result.exit_code == 2, result.output
    message = one_line(result.output)
    assert f"{SPACED} already holds a run" in message
    assert f"To continue it: dropstudy resume '{SPACED}'" in message
    assert "pick another hydra.run.dir, or leave it out" in message
    assert snapshot(tmp / SPACED) == before


def test_rerun_out_the_original_is_refused_and_changes_nothing(finished_run, clean_env, monkeypatch):
    tmp, _ = finished_run
    monkeypatch.chdir(tmp)
    before = snapshot(tmp / SPACED)
    result = invoke("rerun", SPACED, "--out", SPACED)
    assert result.exit_code == 2, result.output
    assert f"{SPACED} already holds a run" in one_line(result.output)
    assert "verdict" not in result.output
    assert snapshot(tmp / SPACED) == before


def test_study_into_a_study_dir_is_refused_and_changes_nothing(dropstudy, tmp_path):
    one_arm = "study.arms=[0.5]"  # what is refused is the study's directory, not its arms' count
    assert dropstudy("study", *QUICK_REGRESSION, *QUIET, one_arm, "hydra.run.dir=s").code == 0
    before = snapshot(tmp_path / "s")
    result = invoke("study", *QUICK_REGRESSION, *QUIET, "seed=1", "hydra.run.dir=s")
    assert result.exit_code == 2, result.output
    assert "s already holds a study (study.json)" in one_line(result.output)
    # A run into a study dir, or into one of its arms, is refused too.
    assert invoke("train", *QUICK_REGRESSION, *QUIET, "hydra.run.dir=s").exit_code == 2
    result = invoke("train", *QUICK_REGRESSION, *QUIET, "hydra.run.dir=s/dropout-0.5")
    assert result.exit_code == 2 and "s/dropout-0.5 already holds a run" in one_line(result.output)
    assert snapshot(tmp_path / "s") == before


def test_sweep_into_a_sweep_dir_is_refused_and_changes_nothing(regression_sweep, clean_env):
    sweep_dir, first = regression_sweep
    assert first.code == 0, first.output
    before = snapshot(sweep_dir)
    result = invoke("sweep", *SWEEP_GRID, "sweep.vectorize=false", f"hydra.sweep.dir={sweep_dir}")
    assert result.exit_code == 2, result.output
    assert f"{sweep_dir} already holds a sweep" in one_line(result.output)
    assert "sweep dir:" not in result.output, "no table of the old sweep"
    assert snapshot(sweep_dir) == before


# --------------------------------------------------------------------------- one writer


def test_of_two_writers_of_one_dir_one_exits_2_naming_the_other(clean_env, tmp_path):
    run = tmp_path / "two writers" / "x"
    args = ["train", "trainer.epochs=1000000", "trainer.eval_every=100", *QUIET, f"hydra.run.dir={run}"]
    with Child(args, tmp_path, clean_env) as first:
        lock = run / ".lock"
        first.wait_for(lambda: lock.is_file() and f'"pid": {first.pid},' in lock.read_text(),
                       "the first writer to hold the directory")

        second = cli(tmp_path, clean_env, *args)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"{run} is being written by pid {first.pid} (" in one_line(second.stderr)
        assert "on host" in second.stderr and "Traceback" not in second.stderr
        resumed = invoke("resume", str(run))  # resume takes the same lock
        assert resumed.exit_code == 2 and f"is being written by pid {first.pid} (" in one_line(resumed.output)

        first.wait_for(lambda: (run / "metrics.jsonl").is_file(), "the first writer's first metrics row")
        first.send_signal(signal.SIGINT)
        result = first.finish()
    stdout, stderr = result.stdout, result.stderr
    assert result.code == 130, stdout + stderr
    epochs = [row["epoch"] for row in read_jsonl(run / "metrics.jsonl") if "train/loss" in row]
    assert epochs and epochs == sorted(set(epochs)), "one run's rows: strictly increasing epochs"
    assert not (run / ".lock").exists(), "the lock file goes with its holder"
    # The interrupted run says how to continue it, as one pasteable command.
    (line,) = [ln for ln in stdout.splitlines() if "to continue from its last checkpoint:" in ln]
    assert shlex.split(line.split("checkpoint:", 1)[1]) == ["dropstudy", "resume", str(run)]


def test_the_os_releases_the_lock_of_a_killed_writer(clean_env, tmp_path):
    run = tmp_path / "r"
    hold = ("import sys, time; from dropstudy.store.rundir import claim_run_dir; "
            "lock = claim_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], env=clean_env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirClaimError, match=f"being written by pid {holder.pid} "):
            claim_run_dir(run)
    finally:
        holder.kill()
        holder.wait()
    with claim_run_dir(run):  # the dead holder's lock is gone, though its lock file stayed
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not (run / ".lock").exists()


# --------------------------------------------------------------------------- default names


def test_default_dirs_of_processes_started_in_one_second_differ(clean_env, tmp_path):
    code = ("from dropstudy.config.compose import compose; from dropstudy.sweeps.search import plan_sweep; "
            "print(compose([], return_hydra_config=True).hydra.run.dir); print(plan_sweep(['model.dropout=0,0.5']).sweep_dir)")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=clean_env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    names = [p.communicate(timeout=120)[0].split() for p in procs]
    stamp = r"runs/regression/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-"
    for run_dir, sweep_dir in names:
        assert re.fullmatch(stamp + r"train-[0-9a-f]{4}", run_dir), run_dir
        assert re.fullmatch(stamp + r"sweep-[0-9a-f]{4}", sweep_dir), sweep_dir
    # What follows the time differs, so the names differ even when both started in one second.
    (run_a, sweep_a), (run_b, sweep_b) = names
    assert run_a[-4:] != run_b[-4:] and sweep_a[-4:] != sweep_b[-4:]
    assert run_a[-4:] == sweep_a[-4:], "one id per process"


# --------------------------------------------------------------------------- what the CLI prints

def test_help_shows_the_run_dir_format():
    assert "runs/<experiment>/<date>_<time>-<command>-<id>/" in invoke("--help").output
    assert "runs/<experiment>/<date>_<time>-rerun-<id>" in one_line(invoke("rerun", "--help").output)


def test_printed_sync_and_rerun_commands_paste_into_a_shell(finished_run, clean_env, monkeypatch):
    tmp, result = finished_run
    monkeypatch.chdir(tmp)
    (line,) = [ln for ln in result.stdout.splitlines() if "W&B (offline):" in ln]
    words = shlex.split(line.split("W&B (offline):", 1)[1])
    assert words[:2] == ["wandb", "sync"] and len(words) == 3
    assert [Path(p) for p in glob(words[2])] == sorted((tmp / SPACED / "wandb").glob("offline-run-*"))
    resumed = invoke("resume", SPACED)
    assert resumed.exit_code == 2
    assert shlex.split(one_line(resumed.output).split("use: ", 1)[1]) == ["dropstudy", "rerun", SPACED]


def test_an_unquoted_value_with_spaces_gets_a_hint(clean_env):
    result = invoke("train", "trainer.epochs=2", "hydra.run.dir=my", "runs/x", "seed=1")
    assert result.exit_code == 2
    assert "'runs/x' is not an override" in one_line(result.output)
    assert "quote the whole override: 'hydra.run.dir=my runs/x'" in one_line(result.output)


def test_resume_or_rerun_of_a_file_says_it_is_not_a_directory(clean_env, tmp_path):
    (tmp_path / "notes.txt").write_text("a file\n")
    for command in ("resume", "rerun"):
        result = invoke(command, str(tmp_path / "notes.txt"))
        assert result.exit_code == 2 and "notes.txt" in result.output and "not a directory" in one_line(result.output)
