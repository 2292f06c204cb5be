"""Resume at every level: a study stopped in its second arm, one arm of it resumed by hand, a
sweep stopped mid-way (one job after another, and batched), and resumes that are refused."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Child, clean_environment, read_jsonl
from typer.testing import CliRunner

from dropstudy.cli import app

# Long enough to stop each run mid-way, short enough for the fast suite; one torch thread, since
# two helpers' worth of threads on two cores only slow the 200-unit MLP down.
LONG = ["trainer.epochs=2000", "trainer.eval_every=100", "trainer.log_every=10", "trainer.threads=1"]
GRID = ["model.dropout=0,0.5", "seed=0,1", *LONG, "tracker.mode=disabled"]


def stop_once_it_logs(proc: Child, metrics: Path) -> str:
    """Ctrl-C as soon as `metrics` has a row; the process's output once it has ended."""
    with proc:
        proc.wait_for(lambda: metrics.is_file() and metrics.stat().st_size, f"a row in {metrics}", timeout=300)
        proc.send_signal(signal.SIGINT)
        return proc.finish(timeout=300).output


def start(cwd: Path, env: dict[str, str], *args: str) -> Child:
    return Child(list(args), cwd, env)


def results(run: Path) -> dict:
    """The final metrics of a run, less wall-clock speed."""
    final = json.loads((run / "summary.json").read_text())["final"]
    return {k: v for k, v in final.items() if not k.startswith("perf/")}


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def logged_epochs(run: Path) -> list[int]:
    return [row["epoch"] for row in read_jsonl(run / "metrics.jsonl")]


def statuses(record: dict) -> list[str]:
    return [entry["status"] for entry in record.get("arms", record.get("jobs"))]


# --------------------------------------------------------------------------- studies


@pytest.fixture(scope="module")
def stopped_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A study (W&B offline) stopped by Ctrl-C in its second arm, and that arm trained alone,
    uninterrupted, for reference."""
    tmp = tmp_path_factory.mktemp("study")
    env = clean_environment(tmp)
    proc = start(tmp, env, "study", *LONG, "hydra.run.dir=study")
    output = stop_once_it_logs(proc, tmp / "study" / "dropout-0.5" / "metrics.jsonl")
    assert proc.returncode == 130, output
    reference = subprocess.run([sys.executable, "-m", "dropstudy", "train", *LONG, "model.dropout=0.5",
                                "tracker.mode=disabled", "hydra.run.dir=whole"],
                               cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    return tmp / "study", tmp / "whole"


@pytest.fixture
def study(stopped_study, tmp_path: Path, clean_env) -> Path:
    copy = tmp_path / "study"
    shutil.copytree(stopped_study[0], copy)
    record = json.loads((copy / "study.json").read_text())
    assert record["status"] == "interrupted" and statuses(record) == ["finished", "interrupted"]
    return copy


def assert_study_redrawn(study: Path, figures_before: dict[str, bytes], whole: Path) -> None:
    record = json.loads((study / "study.json").read_text())
    assert record["status"] == "finished" and statuses(record) == ["finished", "finished"]
    for arm in record["arms"]:  # the record holds the arms' final metrics as they now stand
        assert arm["final"] == json.loads((study / arm["label"] / "summary.json").read_text())["final"]
    assert results(study / "dropout-0.5") == results(whole), "resumed arm == uninterrupted run"
    redrawn = files(study / "plots")
    assert redrawn.keys() == figures_before.keys()
    assert all(redrawn[name] != figures_before[name] for name in redrawn), "every comparison figure is redrawn"
    comparison = sorted((study / "wandb").glob("offline-run-*"))
    assert len(comparison) == 2 and len({run.name.split("-")[-1] for run in comparison}) == 1, \
        "the redrawn figures go to the same W&B comparison run"


def test_resume_study_finishes_its_arms_and_redraws_the_comparison(study, stopped_study, dropstudy):
    figures, first_arm = files(study / "plots"), files(study / "dropout-0")
    result = dropstudy("resume", "study")
    assert result.code == 0, result.output
    assert "dropout-0: finished, kept" in result.stdout and "dropout-0.5: interrupted, resumes after epoch" in result.stdout
    assert "study status: finished" in result.stdout
    assert_study_redrawn(study, figures, stopped_study[1])
    assert files(study / "dropout-0") == first_arm, "a finished arm is kept as it was"


def test_resuming_one_arm_by_hand_updates_its_study(study, stopped_study, dropstudy):
    figures = files(study / "plots")
    result = dropstudy("resume", "study/dropout-0.5")
    assert result.code == 0, result.output
    assert "study study: finished (study.json rewritten)" in result.stdout
    assert_study_redrawn(study, figures, stopped_study[1])


@pytest.mark.slow  # its path is covered fast in-process; this one runs the real thing end to end
def test_resume_study_trains_the_arms_it_never_reached(study, stopped_study, dropstudy):
    """A study stopped before its second arm began (its directory removed, its study.json gone):
    the arm is trained from the study's own config."""
    shutil.rmtree(study / "dropout-0.5")
    (study / "study.json").unlink()
    result = dropstudy("resume", "study")
    assert result.code == 0, result.output
    assert "dropout-0.5: not run, starts (never started)" in result.stdout
    record = json.loads((study / "study.json").read_text())
    assert record["status"] == "finished" and statuses(record) == ["finished", "finished"]
    assert results(study / "dropout-0.5") == results(stopped_study[1])


# --------------------------------------------------------------------------- refused resumes


def test_resume_of_a_file_is_not_a_directory(tmp_path, clean_env):
    (tmp_path / "notes.txt").write_text("x")
    result = CliRunner().invoke(app, ["resume", str(tmp_path / "notes.txt")], prog_name="dropstudy")
    assert result.exit_code == 2 and "notes.txt: not a directory" in result.output


def test_a_refused_resume_leaves_no_resume_log(stopped_study, tmp_path, dropstudy):
    """Refused once the run is being set up (the data changed since it started) and when its
    checkpoint cannot be read: exit 2, and the run dir holds no resume.log."""
    run = tmp_path / "run"
    shutil.copytree(stopped_study[0] / "dropout-0.5", run)
    provenance = json.loads((run / "provenance.json").read_text())
    (run / "provenance.json").write_text(json.dumps({**provenance, "data_sha256": "0" * 64}))
    result = dropstudy("resume", "run")
    assert result.code == 2 and "data has changed" in result.stderr, result.output
    assert not (run / "resume.log").exists()

    checkpoint = run / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    result = dropstudy("resume", "run")
    assert result.code == 2 and "truncated or corrupt" in result.stderr, result.output
    assert not (run / "resume.log").exists()


# --------------------------------------------------------------------------- sweeps


def test_resume_sweep_keeps_finished_jobs_and_finishes_the_rest(clean_env, tmp_path, dropstudy):
    proc = start(tmp_path, clean_env, "sweep", *GRID, "sweep.vectorize=false", "hydra.sweep.dir=sw")
    output = stop_once_it_logs(proc, tmp_path / "sw" / "1" / "metrics.jsonl")
    assert proc.returncode == 130, output
    sweep = tmp_path / "sw"
    assert statuses(json.loads((sweep / "sweep.json").read_text())) == ["finished", "interrupted", "not run", "not run"]
    first_job = files(sweep / "0")

    result = dropstudy("resume", "sw")
    assert result.code == 0, result.output
    assert "#1 (model.dropout=0 seed=1): interrupted, resumes after epoch" in result.stderr
    assert "#2 (model.dropout=0.5 seed=0): not run, starts (never started)" in result.stderr
    assert "one after another in this process" in result.stderr
    assert result.stdout.count("finished") == 4, "the whole table again"
    record = json.loads((sweep / "sweep.json").read_text())
    assert statuses(record) == ["finished"] * 4 and not record["interrupted"] and record["failed"] == []
    assert files(sweep / "0") == first_job, "a finished job's files are untouched"
    assert len(json.loads((sweep / "1" / "provenance.json").read_text())["resumed"]) == 1
    for job in range(1, 4):  # every row once: a resumed job drops nothing and repeats nothing
        assert logged_epochs(sweep / str(job)) == logged_epochs(sweep / "0"), job


@pytest.mark.slow
def test_resume_batched_sweep_starts_members_without_a_checkpoint_again(clean_env, tmp_path, dropstudy):
    proc = start(tmp_path, clean_env, "sweep", *GRID, "hydra.sweep.dir=sw")
    output = stop_once_it_logs(proc, tmp_path / "sw" / "0" / "metrics.jsonl")
    sweep = tmp_path / "sw"
    record = json.loads((sweep / "sweep.json").read_text())
    assert record["mode"] == "batched" and set(statuses(record)) == {"interrupted"}, output
    checkpointed = [(sweep / str(n) / "checkpoints" / "last.pt").is_file() for n in range(4)]
    uninterrupted = [*range(10, 2001, 10), 2000]  # what a run of GRID logs: every 10th epoch, the test row

    result = dropstudy("resume", "sw")
    assert result.code == 0, result.output
    for num, setting in enumerate(["model.dropout=0 seed=0", "model.dropout=0 seed=1",
                                   "model.dropout=0.5 seed=0", "model.dropout=0.5 seed=1"]):
        said = (f"member {num} ({setting}): interrupted, "
                + ("resumed after epoch" if checkpointed[num]
                   else "restarts from scratch: the batched sweep wrote no checkpoint"))
        assert said in result.stderr, result.stderr
        assert logged_epochs(sweep / str(num)) == uninterrupted, num
    assert statuses(json.loads((sweep / "sweep.json").read_text())) == ["finished"] * 4
