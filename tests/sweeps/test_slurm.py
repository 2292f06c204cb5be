"""`dropstudy sweep hydra/launcher=slurm` on a real SLURM (`scripts/local_slurm.sh start`, one node,
this machine): the sweep's table and SLURM's record of each job, a job that fails on the node,
and a job that SLURM requeues and that hits its time limit, which continues from its checkpoint
to exactly an uninterrupted run's metrics. `make test-cluster` runs them; without a SLURM they
are skipped, saying why (in CI, where .ci/run starts one, they fail instead)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_jsonl
from test_sweep import assert_complete_sweep
from wandb_offline import load_run

pytestmark = pytest.mark.slurm

# One CPU and little memory per job, so the two jobs of a sweep run side by side on one small node.
ON_SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "trainer.threads=1"]


def slurm_problem() -> str | None:
    """Why no SLURM job can run here, or None when sinfo shows a node that takes jobs."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "sinfo/sbatch not installed"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()}"
    if not {"idle", "mixed", "allocated"} & set(proc.stdout.split()):
        return f"no node takes jobs (sinfo: {' '.join(proc.stdout.split()) or 'no nodes'})"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    problem = slurm_problem()
    if problem is None:
        return
    message = f"no SLURM here ({problem}); start one with: sudo scripts/local_slurm.sh start"
    if os.environ.get("DROPSTUDY_REQUIRE_SLURM"):
        pytest.fail(message)
    pytest.skip(message)


def sweep(tmp_path: Path, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dropstudy", "sweep", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sacct_state(job_id: str) -> str:
    return subprocess.run(["sacct", "-n", "-P", "-X", "-o", "State", "-j", job_id], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_sweep_runs_on_slurm_and_its_table_names_each_job(clean_env, tmp_path):
    proc = sweep(tmp_path, clean_env, "model.dropout=0,0.5", "trainer.epochs=50", *ON_SLURM, "hydra.sweep.dir=sw")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # With accounting, submitit's sacct polls succeed: none of its "Bypassing sacct error" warnings.
    assert "sacct" not in output and "Traceback" not in output, output
    sw = tmp_path / "sw"
    assert_complete_sweep(sw, {f"model.dropout={p} trainer.epochs=50": (float(p), 0) for p in ("0", "0.5")})
    table = json.loads((sw / "sweep.json").read_text())
    for job in table["jobs"]:
        summary = json.loads((tmp_path / job["run_dir"] / "summary.json").read_text())
        # The printed table is read from the run dirs the jobs wrote on the node.
        row = next(line for line in proc.stdout.splitlines() if f"│ {job['num']} │" in line)
        assert f"val/loss {summary['final']['val/loss']:.4g}" in row and job["slurm"]["job_id"] in row
        slurm = job["slurm"]
        assert slurm["state"] == sacct_state(slurm["job_id"]) == "COMPLETED"
        assert "Job completed successfully" in (tmp_path / slurm["stderr"]).read_text()
        # The job's own log holds this run's training lines: it ran this job, not another.
        assert f"[dropout-{summary['dropout']:g}]" in (tmp_path / slurm["stderr"]).read_text()
    assert [j["slurm"]["job_id"] for j in table["jobs"]] == [f"{table['jobs'][0]['slurm']['job_id'][:-2]}_{i}"
                                                             for i in range(2)]


def test_a_job_that_fails_on_the_node_is_failed_in_the_table_with_its_log(clean_env, tmp_path):
    # Job 1's batch script stops before Python starts (as a failed `module load` would): no run
    # dir, no result; only SLURM knows it ended.
    fail_second = 'hydra.launcher.setup=["[ $SLURM_ARRAY_TASK_ID != 1 ] || exit 3"]'
    proc = sweep(tmp_path, clean_env, "model.dropout=0,0.5", "trainer.epochs=20", *ON_SLURM, fail_second,
                 "hydra.sweep.dir=sw")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    ok, failed = table["jobs"]
    assert ok["status"] == "finished" and table["failed"] == [1]
    log = failed["slurm"]["stderr"]
    assert failed["status"] == "failed" and failed["slurm"]["state"] == "FAILED (exit 3:0)"
    assert failed["reason"] == f"SLURM job {failed['slurm']['job_id']} ended FAILED (exit 3:0) before the run started; log: {log}"
    assert (tmp_path / log).is_file()
    row = next(line for line in proc.stdout.splitlines() if "│ 1 │" in line)
    assert "failed" in row and f"log: {log}" in row
    assert f"#1 (model.dropout=0.5) failed: SLURM job {failed['slurm']['job_id']}" in " ".join(output.split())


def wait_until(what: str, condition, timeout: float = 120, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def last_epoch(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    except (OSError, IndexError, ValueError):
        return 0


def start_again_now(job_id: str) -> None:
    """SLURM holds a requeued job about two minutes before it may start again; the test does
    not wait for that, it lets the job start once it is pending and its last attempt has left the
    node. (Started in the very second its old step was still being killed, the new attempt failed
    at once, exit 1, in one CI run out of several.)"""
    wait_until(f"job {job_id} pending again", lambda: subprocess.run(
        ["squeue", "-h", "-o", "%t", "-j", job_id], capture_output=True, text=True).stdout.strip() == "PD")
    wait_until(f"job {job_id}'s last attempt off the node", lambda: not {"RUNNING", "COMPLETING"} & set(subprocess.run(
        ["sacct", "-n", "-P", "--duplicates", "-o", "State", "-j", job_id], capture_output=True, text=True).stdout.split()))
    time.sleep(2)  # slurmd's own cleanup of the ended step, after accounting records its end
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


# SLURM's requeue has timing of its own (the old step's kill wait, accounting catching up); the sweep
# waits it out (slurm.wait_for_slurm_jobs), and a second try guards the rest of that race on a
# loaded CI machine: a real failure fails both.
@pytest.mark.flaky(reruns=1, reruns_delay=5)
def test_a_requeued_and_timed_out_job_continues_to_an_uninterrupted_runs_metrics(clean_env, tmp_path, dropstudy):
    """`scontrol requeue` (SIGTERM to the job, as a preemption) at one point and SIGUSR2 (what
    SLURM sends `signal_delay_s` before the time limit; `scancel --signal=USR2` sends it now) at
    another: each time the run checkpoints, SLURM starts the job again and it resumes in the
    same run dir and W&B run. The result is an uninterrupted run's, exactly."""
    config = ["model.dropout=0.5", "trainer.epochs=20000", "trainer.eval_every=500", "tracker.log_freq=500"]
    job = subprocess.Popen([sys.executable, "-m", "dropstudy", "sweep", *config, *ON_SLURM, "hydra.sweep.dir=sw"],
                           cwd=tmp_path, env=clean_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "sw" / "0"
    try:
        job_id = wait_until("the job's submitit folder", lambda: next(
            (p.name for p in (tmp_path / "sw" / ".submitit").glob("[0-9]*") if (p / f"{p.name}_submitted.pkl").exists()),
            None))
        wait_until("epoch 2000", lambda: last_epoch(run) >= 2000)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        start_again_now(job_id)
        first_resume = wait_until("the first resume", lambda: json.loads((run / "provenance.json").read_text())
                                  .get("resumed"), timeout=180)
        wait_until("epoch 4000 after the first resume",
                   lambda: last_epoch(run) >= first_resume[0]["from_epoch"] + 2000, timeout=180)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        start_again_now(job_id)
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output
    reference = dropstudy("train", *config, "trainer.threads=1", "tracker.mode=disabled", "hydra.run.dir=ref")
    assert reference.code == 0, reference.output

    resumed = json.loads((run / "provenance.json").read_text())["resumed"]
    assert len(resumed) == 2 and 2000 <= resumed[0]["from_epoch"] < resumed[1]["from_epoch"] < 20000, resumed
    rows = read_jsonl(run / "metrics.jsonl")
    training_epochs = [r["epoch"] for r in rows if not any(k.startswith("test/") for k in r)]
    assert len(training_epochs) == len(set(training_epochs)) == 20000 // 10, "every logged epoch once"
    assert without_timings(rows) == without_timings(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    final = json.loads((run / "summary.json").read_text())
    assert final["status"] == "finished"
    assert without_timings([final["final"]]) == without_timings([json.loads((tmp_path / "ref" / "summary.json")
                                                                            .read_text())["final"]])

    # One W&B run over the three attempts: the same id in each offline folder. SIGTERM reaches every
    # process of the job, W&B's service too, so the first attempt's file may end mid-record; the
    # time-limit attempt finishes its W&B run (exit code 140, SIGUSR2) before it is requeued.
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 3 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1, folders
    timed_out, last = load_run(folders[1]), load_run(folders[2])
    assert timed_out.exit_code == 140 and last.exit_code == 0
    logged = [h["epoch"] for h in last.history if "epoch" in h and "train/loss" in h]
    assert logged == [e for e in training_epochs if e > resumed[1]["from_epoch"]]

    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert table["jobs"][0]["status"] == "finished" and table["jobs"][0]["slurm"]["job_id"] == job_id
    log = (tmp_path / table["jobs"][0]["slurm"]["stderr"]).read_text()
    assert "(SLURM restart 1)" in log and "(SLURM restart 2)" in log and "SIGUSR2" in log


def test_an_optuna_search_runs_its_trials_as_slurm_job_arrays(clean_env, tmp_path):
    """Optuna asks for hydra.sweeper.n_jobs trials at a time; each batch is one job array, and
    the trials' numbers follow the arrays' order."""
    from test_search import SEARCH, assert_ranked_search

    proc = sweep(tmp_path, clean_env, *SEARCH, "hydra.sweeper.n_jobs=2", *ON_SLURM, "hydra.sweep.dir=sw")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = assert_ranked_search(tmp_path / "sw", proc.stdout, 4)
    ids = {j["num"]: j["slurm"]["job_id"] for j in table["jobs"]}
    arrays = sorted({job_id.split("_")[0] for job_id in ids.values()}, key=int)
    assert len(arrays) == 2 and [ids[n] for n in range(4)] == [f"{a}_{i}" for a in arrays for i in range(2)]
    for job in table["jobs"]:
        overrides = (tmp_path / "sw" / str(job["num"]) / ".hydra" / "overrides.yaml").read_text()
        # The job SLURM ran under that id trained that trial: its log shows the trial's dropout rate.
        rate = float(job["overrides"][0].removeprefix("model.dropout="))
        assert f"model.dropout={rate}" in overrides and f"p={rate:g}" in (tmp_path / job["slurm"]["stderr"]).read_text()
