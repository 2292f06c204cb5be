"""SLURM's side of a sweep on `hydra/launcher=slurm` (hydra-submitit-launcher): what SLURM says
about each job, and how a job leaves SLURM when its run is interrupted.

`slurm_jobs` reads each job's id and log files from the launcher's `.submitit/` folder and its
state from `sacct`, for the sweep's table; `explain_slurm_failure` makes a job that SLURM
ended before its run could say so `failed`, with that state and its log;
`wait_for_slurm_jobs` waits out the rest after submitit gave up at a job without a result.
`hand_back_to_slurm` ends a job whose run checkpointed after SIGUSR2 (the time limit) or
SIGTERM (requeue, preemption), so that SLURM starts it again; the job then continues its run
(`sweep.SweepJob`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("dropstudy")

SLURM_LAUNCHERS = ("slurm", "submitit_slurm")
# SLURM states after which a job runs no more (unless it is requeued, which makes it PENDING again).
SLURM_ENDED = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
               "PREEMPTED", "COMPLETED")
# States of a job that will still run (or run again): submitit's "not done" ones, and requeue's.
SLURM_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
               "PREEMPTED", "SUSPENDED", "RESIZING")
_SUBMITIT_JOB_DIR = re.compile(r"^(\d+)(?:_(\d+))?$")


def slurm_jobs(sweep_dir: Path) -> dict[int, dict[str, Any]]:
    """Each job's SLURM record, by job number: id, state (from sacct, when accounting answers),
    and its log files. hydra-submitit-launcher keeps a job's files in <sweep dir>/.submitit/<id>/
    (`<array id>_<index>` in an array, whose index is the job's place in its batch), and submits
    the batches of a sweep in order, so sorting the ids gives the job numbers."""
    root = sweep_dir / ".submitit"
    found = []
    for folder in root.iterdir() if root.is_dir() else ():
        match = _SUBMITIT_JOB_DIR.match(folder.name)
        if match and (folder / f"{folder.name}_submitted.pkl").is_file():
            found.append((int(match.group(1)), int(match.group(2) or 0), folder))
    states = slurm_states([folder.name for *_, folder in found])
    jobs = {}
    for num, (_, _, folder) in enumerate(sorted(found)):
        jobs[num] = {"job_id": folder.name, "state": states.get(folder.name),
                     "stdout": str(folder / f"{folder.name}_0_log.out"),
                     "stderr": str(folder / f"{folder.name}_0_log.err")}
    return jobs


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """sacct's state of each job (e.g. COMPLETED, FAILED, CANCELLED by 0); empty without accounting."""
    import shutil
    import subprocess

    if not job_ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,ExitCode", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job_id, state, exit_code = (line.split("|") + ["", ""])[:3]
        states[job_id] = f"{state} (exit {exit_code})" if exit_code not in ("", "0:0") else state
    return states


def explain_slurm_failure(outcome: Any) -> None:
    """A job SLURM ended before its run could say how it ended (its summary is missing, or still
    says running) is failed, and its reason names SLURM's state and the job's log; a failed
    run's reason gains the log too."""
    slurm = outcome.slurm
    state = slurm["state"] or "unknown state"
    ended = any(state.startswith(s) for s in SLURM_ENDED)
    if outcome.status in ("not run", "running") and ended:
        when = "before the run started" if outcome.status == "not run" else "while it ran"
        outcome.status, outcome.reason = "failed", f"SLURM job {slurm['job_id']} ended {state} {when}"
    if outcome.status == "failed":
        outcome.reason = f"{outcome.reason or 'failed'}; log: {slurm['stderr']}"


def wait_for_slurm_jobs(sweep_dir: Path, poll_s: float = 1.0, timeout_s: float | None = None) -> None:
    """Until no job of the sweep is queued or running (submitit stops waiting at the first job
    that ended without a result; the others still run), or timeout_s."""
    import subprocess
    import time

    ids = sorted({record["job_id"].split("_")[0] for record in slurm_jobs(sweep_dir).values()})
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    errors, empty = 0, 0
    while ids and (deadline is None or time.monotonic() < deadline):
        try:
            answer = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True,
                                    text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return
        if answer.returncode != 0 and "Invalid job id" not in answer.stderr:
            # slurmctld busy (e.g. while it requeues a job): ask again rather than take silence for done.
            errors += 1
            if errors > 30:
                return
            time.sleep(poll_s)
            continue
        errors = 0
        if answer.stdout.split():
            empty = 0
        else:
            # A job being requeued is out of squeue's list while its old step is killed (up to
            # SLURM's KillWait): done when it stays out and accounting no longer calls it alive.
            empty += 1
            if empty >= 3:
                alive = [s for s in slurm_states(ids).values() if s.split(" ")[0] in SLURM_ALIVE]
                if not alive or empty * poll_s > 180:
                    return
        time.sleep(poll_s)



def hand_back_to_slurm(signum: int) -> None:
    """End a SLURM job whose run was interrupted and checkpointed, the way SLURM will start it
    again. SIGUSR2 (the time limit is near) goes to submitit's handler, which requeues the job
    (at most hydra.launcher.max_num_timeout times) and exits; after SIGTERM (`scontrol requeue`,
    a preemption, `scancel`) the job exits 143 without a result, so SLURM either starts it again
    or reports it cancelled."""
    import signal

    if signum == signal.SIGUSR2:
        log.warning("SLURM time limit near (SIGUSR2): checkpoint written; requeueing the job, which continues from it")
        handler = signal.getsignal(signal.SIGUSR2)  # submitit's, restored when training stopped
        if callable(handler):
            handler(signum, None)
    else:
        log.warning(f"stopped by SLURM ({signal.Signals(signum).name}): checkpoint written; "
                    "if SLURM requeues the job, it continues from it")
        raise SystemExit(128 + signum)
