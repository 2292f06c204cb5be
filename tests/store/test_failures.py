"""Failures of the machine: a write refused by a real kernel limit (a file size limit, a
read-only mount, a full tmpfs) ends the run with one message naming the file, exit code 74, a
`failed` summary.json and no temporary file left; summary.json says `running` while a run
is in progress; a failed checkpoint write leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import QUICK_REGRESSION, clean_environment, wait_for

EXIT_IO_ERROR = 74
# A regression MLP checkpoint (weights + SGD momentum) is ~670 KB; config, summary, provenance,
# the log and a short metrics.jsonl are a few KB each.
FILE_SIZE_LIMIT = 100_000
LONG_RUN = ["trainer.epochs=100000", "trainer.eval_every=1000", "trainer.log_every=1000",
            "trainer.checkpoint_every=50", "tracker.mode=disabled"]


def dropstudy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dropstudy", *args]


def limit_file_size() -> None:
    """In the child: writes past FILE_SIZE_LIMIT fail with EFBIG. SIGXFSZ, which the kernel
    sends first and which kills by default, is ignored so the write returns the error."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def run_limited(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(dropstudy_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, check=False,
                          timeout=300, preexec_fn=limit_file_size)


def assert_one_message(proc: subprocess.CompletedProcess, *parts: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_IO_ERROR, output
    assert "Traceback" not in output and "Logging error" not in output, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output  # printed once, not once per layer
    for part in parts:
        assert part in errors[0], (part, errors[0])


def tmp_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


def test_help_documents_the_write_failure_exit_code():
    from typer.testing import CliRunner

    from dropstudy.cli import app

    result = CliRunner().invoke(app, ["--help"], prog_name="dropstudy")
    assert result.exit_code == 0 and "74 a write failed" in " ".join(result.output.split()), result.output


def test_a_file_size_limit_fails_the_run_with_one_message(clean_env, tmp_path):
    proc = run_limited(tmp_path, clean_env, "train", *QUICK_REGRESSION, "trainer.checkpoint_every=10", "tracker.mode=disabled",
                       "hydra.run.dir=run")
    run = tmp_path / "run"
    assert_one_message(proc, f"cannot write checkpoints/last.pt in {run}", "File too large")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "checkpoints/last.pt" in summary["reason"], summary
    assert summary["epoch"] == 10  # the first checkpoint (checkpoint_every) is the write that failed
    assert tmp_files(run) == [], "a failed write leaves no temporary file behind"
    assert not (run / "checkpoints" / "last.pt").exists()


# --------------------------------------------------------------------------- a run in progress


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A long run, its summary.json read while it trains, then Ctrl-C once it has a checkpoint."""
    tmp = tmp_path_factory.mktemp("long")
    env = clean_environment(tmp)
    run = tmp / "run"
    proc = subprocess.Popen(dropstudy_cmd("train", *LONG_RUN, "hydra.run.dir=run"), cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []

    def checkpointed() -> bool:
        if (run / "summary.json").is_file():
            seen.append(json.loads((run / "summary.json").read_text())["status"])
        return (run / "checkpoints" / "last.pt").is_file()

    try:
        wait_for(checkpointed, "the first checkpoint", proc, timeout=240)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"dir": run, "tmp": tmp, "env": env, "seen": seen, "code": proc.returncode, "output": out + err}


@pytest.mark.slow
def test_summary_says_running_while_the_run_trains(interrupted_run):
    run = interrupted_run["dir"]
    assert interrupted_run["seen"] and set(interrupted_run["seen"]) == {"running"}, interrupted_run
    assert interrupted_run["code"] == 130, interrupted_run["output"]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_a_failed_checkpoint_write_ends_the_run_and_keeps_the_previous_checkpoint(interrupted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run["dir"], run)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    proc = run_limited(tmp_path, interrupted_run["env"], "resume", str(run))
    assert_one_message(proc, f"cannot write checkpoints/last.pt in {run}", "File too large")
    assert (run / "checkpoints" / "last.pt").read_bytes() == before, "the last good checkpoint is intact"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "checkpoints/last.pt" in summary["reason"], summary
    assert tmp_files(run) == []


# --------------------------------------------------------------------------- real mounts


def mount_namespace_reason() -> str | None:
    """Why a private mount namespace (for a read-only bind mount or a small tmpfs) is not
    available here, or None when it is."""
    if shutil.which("unshare") is None:
        return "no `unshare` command"
    with tempfile.TemporaryDirectory() as target:
        probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", target],
                               capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"cannot mount in a private mount namespace ({probe.stderr.strip() or probe.returncode})"
    return None


def in_namespace(setup: str, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    """`setup` (sh, with mount) and then `cmd`, in a private mount namespace: the mounts vanish
    with the process and nothing outside the test sees them."""
    script = f"{setup} && exec \"$@\""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *cmd], capture_output=True, text=True, check=False,
                          timeout=300, **kwargs)


def skip_without_read_only_mounts() -> None:
    """Skip, saying why in the output too, where this machine cannot make a read-only directory."""
    reason = read_only_reason()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)


def read_only_reason() -> str | None:
    """chmod stops writes for a normal user; root ignores it, so then a read-only bind mount."""
    if os.geteuid() != 0:
        return None
    return mount_namespace_reason()


def run_in_read_only(directory: Path, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return subprocess.run(dropstudy_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300)
    return in_namespace(f"mount --bind -o ro '{directory}' '{directory}'", *dropstudy_cmd(*args), cwd=cwd, env=env)


def test_a_read_only_run_dir_is_one_message_for_train(clean_env, tmp_path):
    skip_without_read_only_mounts()
    run = tmp_path / "run"
    run.mkdir()
    proc = run_in_read_only(run, tmp_path, clean_env, "train", *QUICK_REGRESSION, "tracker.mode=disabled",
                            "hydra.run.dir=run")
    assert_one_message(proc, "cannot write .lock in run:", "Read-only file system" if os.geteuid() == 0 else "Permission")
    assert list(run.iterdir()) == []


@pytest.mark.slow
def test_a_read_only_run_dir_is_one_message_for_resume(interrupted_run, tmp_path):
    skip_without_read_only_mounts()
    run = tmp_path / "run"
    shutil.copytree(interrupted_run["dir"], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_in_read_only(run, tmp_path, interrupted_run["env"], "resume", str(run))
    assert_one_message(proc, f".lock in {run}", "Read-only file system" if os.geteuid() == 0 else "Permission")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_full_disk_names_the_file_and_the_free_space(clean_env, tmp_path):
    reason = mount_namespace_reason()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    # The run dir lives on a 256 KB tmpfs that disappears with the namespace: copy it out.
    script = (f"mount -t tmpfs -o size=256k tmpfs '{disk}' && "
              f"{' '.join(dropstudy_cmd())} train {' '.join(QUICK_REGRESSION)} tracker.mode=disabled "
              f"hydra.run.dir='{disk}/run'; code=$?; cp -a '{disk}/run' '{out}'; exit $code")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=clean_env,
                          capture_output=True, text=True, check=False, timeout=300)
    assert_one_message(proc, f"cannot write checkpoints/last.pt in {disk / 'run'}", "No space left on device",
                       f"free on {disk}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["reason"], summary
    assert tmp_files(out) == [], "the half-written checkpoint is removed, giving its space back"


def test_a_data_cache_that_cannot_be_written_is_a_warning_and_leaves_no_tmp(tmp_path):
    from cifar_files import write_torchvision_layout

    write_torchvision_layout(tmp_path, n_train=120, n_test=30)  # ~460 KB of decoded tensors to cache
    script = ("import sys; from pathlib import Path; from dropstudy.data.datasets import read_cifar10; "
              "tensors, source = read_cifar10(Path(sys.argv[1]), download=False, verify=False, log=print); "
              "print('decoded', len(tensors['train_labels']))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          check=False, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cache = tmp_path / "dropstudy-cifar10-torchvision.pt"
    assert f"could not write the cache {cache}: cannot write {cache}: File too large" in proc.stderr, proc.stderr
    assert "decoded 120" in proc.stdout and "Traceback" not in proc.stderr
    assert not cache.exists() and tmp_files(tmp_path) == []
