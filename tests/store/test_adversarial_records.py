"""Adversarial records: what a crash, a stray edit or a misplaced directory leaves in a run's
files, and what resume, rerun and report make of it. The rule each case checks: a refusal is one
line naming the file (and line), exit 2, and leaves every file as it was (no partial report/, no
rewritten summary.json or provenance.json); what is read around (a half-written last line) is said
in one line; a record never counts or claims what did not happen.

This is the place for more such cases of a run's own records (metrics.jsonl, summary.json,
provenance.json, .hydra/config.yaml, the data cache, nested directories); damage done by other
processes to a running command (signals, full disks, concurrent writers) goes to
test_adversarial_processes.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from cifar_files import write_torchvision_layout
from conftest import QUICK_REGRESSION, read_jsonl, run_once
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.data.datasets import read_cifar10
from dropstudy.data.files import DataError

QUIET = ["tracker.mode=disabled"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), prog_name="dropstudy")


def tree(directory: Path) -> dict[str, str]:
    """Every file under `directory` (but the test's HOME) and a digest of its bytes: what
    "changes nothing" compares."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and "home" not in p.relative_to(directory).parts[:1]}


def one_line_error(output: str) -> None:
    assert "Traceback" not in output and "JSONDecodeError" not in output and "KeyError" not in output, output
    assert output.count("error:") == 1, output


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished regression run (40 epochs, untracked) and, beside it, a rerun of it; tests copy them."""
    where = tmp_path_factory.mktemp("records")
    run_once(where, "train", *QUICK_REGRESSION, *QUIET, "hydra.run.dir=runs/a")
    run_once(where, "rerun", "runs/a", "--out", "runs/again")
    return where / "runs"


@pytest.fixture
def run(finished: Path, tmp_path: Path, clean_env) -> Path:
    shutil.copytree(finished / "a", tmp_path / "a")
    return tmp_path / "a"


def crashed_writing_its_test_row(run: Path) -> list[dict]:
    """The run as a crash leaves it while its last row (the test metrics, after the last
    checkpoint) was half-written: summary.json says interrupted; returns the rows it had."""
    rows = read_jsonl(run / "metrics.jsonl")
    whole = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(whole[:-1]) + "\n" + whole[-1][:20])
    summary = {"status": "interrupted", "reason": "KeyboardInterrupt", "epoch": 40, "pid": 999999}
    (run / "summary.json").write_text(json.dumps(summary))
    return rows


# --------------------------------------------------------------------------- metrics.jsonl


def test_resume_drops_a_half_written_last_line_saying_so_and_records_what_happened(run, dropstudy):
    rows = crashed_writing_its_test_row(run)
    lines = len((run / "metrics.jsonl").read_text().splitlines())
    result = dropstudy("resume", "a")
    assert result.code == 0, result.output
    assert "Traceback" not in result.output
    assert f"metrics.jsonl: line {lines}, the last, is half-written" in result.stderr.replace("\n", " ")
    assert read_jsonl(run / "metrics.jsonl") == rows, "the test row is computed again, exactly as it was"
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    resumed = json.loads((run / "provenance.json").read_text())["resumed"]
    assert [r["from_epoch"] for r in resumed] == [40]


@pytest.mark.parametrize("damage", ["torn", "binary"])
def test_a_damaged_line_before_the_last_refuses_resume_rerun_and_report_changing_nothing(run, damage):
    finished_summary = (run / "summary.json").read_text()
    crashed_writing_its_test_row(run)
    lines = (run / "metrics.jsonl").read_bytes().split(b"\n")
    lines[2] = lines[2][:15] if damage == "torn" else b"\x80\x81\x00garbage\xff"
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines))

    for args in (("resume", "a"), ("rerun", "a", "--out", "b"), ("report", "a")):
        if args[0] == "report":  # a report reads finished runs only
            (run / "summary.json").write_text(finished_summary)
        before = tree(run.parent)
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        one_line_error(result.output)
        assert "a/metrics.jsonl: line 3 is not a metrics row" in result.output.replace("\n", " "), result.output
        assert tree(run.parent) == before, f"{args[0]} changed files before refusing"


def test_report_and_rerun_leave_out_a_half_written_last_line_saying_so(run, dropstudy):
    summary = (run / "summary.json").read_text()
    crashed_writing_its_test_row(run)
    (run / "summary.json").write_text(summary)  # as if the crash came after it said finished
    result = invoke("report", str(run))
    assert result.exit_code == 0, result.output
    assert "is half-written" in result.output and "left out" in result.output
    assert (run / "report" / "report.csv").is_file()

    result = dropstudy("rerun", "a", "--out", "b")
    assert result.code in (0, 1) and "Traceback" not in result.output, result.output
    assert "is half-written" in result.stderr and "left out of the comparison" in result.stderr


def test_empty_metrics_is_refused_by_rerun_before_writing(run):
    (run / "metrics.jsonl").write_text("")
    result = invoke("rerun", "a", "--out", "b")
    assert result.exit_code == 2 and "missing or empty" in result.output, result.output
    assert not (run.parent / "b").exists()


# --------------------------------------------------------------------------- other records


def test_a_damaged_provenance_is_named_by_resume_and_rerun_before_anything_is_written(run):
    crashed_writing_its_test_row(run)
    (run / "provenance.json").write_text('{"command": "dropstudy train", "git": ')
    before = tree(run.parent)
    for args in (("resume", "a"), ("rerun", "a", "--out", "b")):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        one_line_error(result.output)
        assert "a/provenance.json: not readable JSON" in result.output.replace("\n", " ")
        assert tree(run.parent) == before, f"{args[0]} changed files before refusing"


@pytest.mark.parametrize("summary", ["{not json", "[1, 2]"])
def test_a_damaged_summary_is_named_by_rerun_before_anything_is_written(run, summary):
    (run / "summary.json").write_text(summary)
    before = tree(run.parent)
    result = invoke("rerun", "a", "--out", "b")
    assert result.exit_code == 2, result.output
    one_line_error(result.output)
    assert "a/summary.json: not" in result.output
    assert tree(run.parent) == before


def test_a_study_or_sweep_resume_plans_around_a_half_written_line_and_refuses_a_damaged_one(run):
    from dropstudy.runs.resume import plan_step
    from dropstudy.store.rundir import RunDir, RunDirError

    crashed_writing_its_test_row(run)
    lines = len((run / "metrics.jsonl").read_text().splitlines())
    cfg = RunDir.existing(run).read_config()
    step = plan_step("a", run, cfg, [], "never checkpointed")
    assert step.action == "resume" and step.note == f"after epoch 40 (metrics.jsonl line {lines} is half-written: dropped)"
    (run / "metrics.jsonl").write_text("{}\n" + (run / "metrics.jsonl").read_text())
    with pytest.raises(RunDirError, match="metrics.jsonl: line 1 is not a metrics row"):
        plan_step("a", run, cfg, [], "never checkpointed")


def test_report_names_every_run_it_skips_and_why(finished, tmp_path, clean_env):
    runs = tmp_path / "runs"
    shutil.copytree(finished / "a", runs / "good")
    shutil.copytree(finished / "a", runs / "garbage-config")
    (runs / "garbage-config" / ".hydra" / "config.yaml").write_text("just: [a, list]\n")
    shutil.copytree(finished / "a", runs / "no-summary")
    (runs / "no-summary" / "summary.json").unlink()
    shutil.copytree(finished / "a", runs / "bad-summary")
    (runs / "bad-summary" / "summary.json").write_text("{not json")
    shutil.copytree(finished / "a", runs / "bad-provenance")
    (runs / "bad-provenance" / "provenance.json").write_bytes(b"\x00\xff")  # a report does not need it

    result = invoke("report", "runs")
    assert result.exit_code == 0, result.output
    out = result.output.replace("\n", " ")
    assert "skipped runs/garbage-config: runs/garbage-config/.hydra/config.yaml: not a valid run config" in out
    assert "skipped runs/no-summary: no summary.json" in out
    assert "skipped runs/bad-summary: runs/bad-summary/summary.json: not readable JSON" in out
    assert "skipped runs/bad-provenance" not in out
    with open(runs / "report" / "report.csv") as fh:
        assert {row["n"] for row in csv.DictReader(fh) if row["metric"] == "test/loss"} == {"2"}
    markdown = (runs / "report" / "report.md").read_text()
    assert "runs/garbage-config" in markdown and "runs/no-summary" in markdown


def test_report_with_no_valid_run_exits_2_naming_the_config_and_writes_nothing(run, tmp_path):
    (run / ".hydra" / "config.yaml").write_text("hello: world\n")
    before = tree(run)
    result = invoke("report", str(run))
    assert result.exit_code == 2, result.output
    assert "config.yaml: not a valid run config (no experiment, seed, model, data)" in result.output.replace("\n", " ")
    assert tree(run) == before and not (run / "report").exists()


# --------------------------------------------------------------------------- runs inside runs


def test_no_run_study_sweep_or_rerun_is_made_inside_a_run(run):
    before = tree(run)
    attempts = {
        "train": ("train", *QUICK_REGRESSION, *QUIET, "hydra.run.dir=a/plots"),
        "study": ("study", *QUICK_REGRESSION, *QUIET, "hydra.run.dir=a/st"),
        "sweep": ("sweep", "model.dropout=0,0.5", *QUICK_REGRESSION, *QUIET, "hydra.sweep.dir=a/deep/sw"),
        "rerun": ("rerun", "a", "--out", "a/rr"),
    }
    for name, args in attempts.items():
        result = invoke(*args)
        assert result.exit_code == 2, (name, result.output)
        one_line_error(result.output)
        assert "lies inside a, which holds a run (summary.json)" in result.output.replace("\n", " "), result.output
        assert tree(run) == before and not (run / "st").exists() and not (run / "deep").exists(), name


def test_report_never_counts_a_rerun_as_another_seed(finished, tmp_path, clean_env):
    runs = tmp_path / "runs"
    shutil.copytree(finished, runs)
    result = invoke("report", "runs")
    assert result.exit_code == 0, result.output
    assert "skipped runs/again: a rerun of another run (again/rerun.json), not another seed" in result.output
    with open(runs / "report" / "report.csv") as fh:
        assert {row["n"] for row in csv.DictReader(fh)} == {"1"}

    # A rerun made inside its original before that was refused: still not a seed.
    shutil.rmtree(runs / "report")
    shutil.move(runs / "again", runs / "a" / "rr")
    result = invoke("report", "runs")
    assert result.exit_code == 0, result.output
    assert "skipped runs/a/rr: a rerun of another run" in result.output
    with open(runs / "report" / "report.csv") as fh:
        assert {row["n"] for row in csv.DictReader(fh)} == {"1"}


# --------------------------------------------------------------------------- the data


def test_a_verified_run_does_not_trust_a_cache_decoded_without_the_md5_check(tmp_path):
    write_torchvision_layout(tmp_path)  # hand-made batch files: they fail torchvision's MD5 check
    read_cifar10(tmp_path, download=False, verify=False, log=lambda _: None)
    cache = tmp_path / "dropstudy-cifar10-torchvision.pt"
    with pytest.raises(DataError, match="torchvision rejected it"):
        read_cifar10(tmp_path, download=False, verify=True, log=lambda _: None)
    assert torch.load(cache, weights_only=True).get("verified") is False, "the refusal left the cache as it was"
    tensors, source = read_cifar10(tmp_path, download=False, verify=False, log=lambda _: None)
    assert "cached" in source, "the unchecked run still uses its cache"


@pytest.mark.parametrize("entry, problem", [
    ({"labels": [0] * 40, "batch_label": "x"}, "no 'data' entry"),
    (b"\x80\x04not a pickle", "cannot be unpickled"),
    ({"data": [[0] * 3072] * 40, "labels": [0] * 39}, "expected uint8 rows"),
])
def test_a_malformed_batch_file_is_named_with_what_is_wrong(tmp_path, dropstudy, entry, problem):
    root = tmp_path / "data"
    write_torchvision_layout(root)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(entry if isinstance(entry, bytes) else pickle.dumps(entry))
    with pytest.raises(DataError, match=problem) as caught:
        read_cifar10(root, download=False, verify=False, log=lambda _: None)
    assert str(caught.value).startswith(f"{batch}: not a CIFAR-10 batch file")
    if problem == "no 'data' entry":  # the whole command: one line, exit 2
        result = dropstudy("train", "experiment=cifar10", "data.verify=false", "trainer.epochs=1", *QUIET,
                           "hydra.run.dir=c")
        assert result.code == 2, result.output
        one_line_error(result.output)
        assert f"{batch}: not a CIFAR-10 batch file (no 'data' entry)" in result.stderr.replace("\n", " ")
