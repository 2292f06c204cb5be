"""`dropstudy rerun DIR` of a whole study or sweep: every finished member trained again into a
subdirectory of the same name (a batched sweep's members as one batch again), one verdict
per member and one overall, saved as rerun.json."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import read_jsonl, run_once

SHORT_STUDY = ["trainer.epochs=40", "trainer.eval_every=10", "trainer.log_every=4", "tracker.mode=disabled"]
ARMS = ("dropout-0", "dropout-0.5")


def results(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock measurements, which no two runs share."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in read_jsonl(run / "metrics.jsonl")]


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_study(tmp_path_factory) -> Path:
    """One finished short study, trained once; each test reruns a copy of it."""
    where = tmp_path_factory.mktemp("study")
    run_once(where, "study", *SHORT_STUDY, "hydra.run.dir=st")
    return where / "st"


@pytest.fixture
def study(trained_study, tmp_path, clean_env) -> Path:
    # Same relative path as when it was trained: study.json names its arms as "st/<arm>".
    shutil.copytree(trained_study, tmp_path / "st")
    return tmp_path / "st"


def test_whole_study_rerun_is_identical_on_cpu(dropstudy, study, tmp_path):
    result = dropstudy("rerun", "st", "--out", "again")
    assert result.code == 0, result.output
    for arm in ARMS:
        assert f"  {arm}: identical" in result.stdout
        assert results(tmp_path / "again" / arm) == results(study / arm)
    assert "verdict: identical (2 identical of 2 runs)" in result.stdout
    record = json.loads((tmp_path / "again" / "rerun.json").read_text())
    assert record["verdict"] == "identical" and record["first_difference"] is None and record["skipped"] == []
    assert [(m["name"], m["original"], m["new_dir"], m["verdict"]) for m in record["members"]] == [
        (arm, f"st/{arm}", f"again/{arm}", "identical") for arm in ARMS]
    assert isinstance(record["environment_differences"], list)


def test_whole_study_rerun_with_a_changed_override_differs(dropstudy, study, tmp_path):
    result = dropstudy("rerun", "st", "optim.lr=0.02", "--out", "again")
    assert result.code == 1, result.output
    for arm in ARMS:
        assert f"  {arm}: differs; first difference at step 0 (epoch 4)" in result.stdout
    assert "verdict: differs (2 differs of 2 runs); first difference in dropout-0 at step 0 (epoch 4)" in result.stdout
    assert "likely cause: the overrides given to rerun (optim.lr=0.02)" in result.stdout
    record = json.loads((tmp_path / "again" / "rerun.json").read_text())
    assert record["verdict"] == "differs" and record["overrides"] == ["optim.lr=0.02"]
    assert record["first_difference"].startswith("dropout-0: step 0 (epoch 4)")
    assert [m["verdict"] for m in record["members"]] == ["differs", "differs"]
    saved = (tmp_path / "again" / "dropout-0.5" / ".hydra" / "overrides.yaml").read_text()
    assert "optim.lr=0.02" in saved  # the override reached every member, after the saved ones


def test_unfinished_member_is_skipped_and_named(dropstudy, study, tmp_path):
    summary = study / "dropout-0.5" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "interrupted"}))
    result = dropstudy("rerun", "st", "--out", "again")
    assert result.code == 0, result.output
    assert "skipped, not finished in the original: dropout-0.5 (interrupted)" in result.stdout
    assert not (tmp_path / "again" / "dropout-0.5").exists()
    record = json.loads((tmp_path / "again" / "rerun.json").read_text())
    assert [m["name"] for m in record["members"]] == ["dropout-0"]
    assert record["skipped"] == [{"name": "dropout-0.5", "original": "st/dropout-0.5", "status": "interrupted"}]


@pytest.mark.parametrize("out", ["st", "st/dropout-0"])
def test_out_holding_a_run_is_refused_and_the_original_kept(dropstudy, study, out):
    before = tree_digest(study)
    result = dropstudy("rerun", "st", "--out", out)
    assert result.code == 2, result.output
    assert f"{out} already holds" in result.stderr and "pick another --out" in result.stderr
    assert "Traceback" not in result.output
    assert tree_digest(study) == before


def test_batched_sweep_rerun_is_identical(dropstudy, tmp_path):
    """The jobs of a batched sweep drew their dropout masks from one generator: only trained
    together again do they reproduce (alone, the p=0.5 job would differ)."""
    sweep = dropstudy("sweep", "trainer.epochs=20", "trainer.eval_every=10", "tracker.mode=disabled",
                      "model.dropout=0.0,0.5", "hydra.sweep.dir=sw")
    assert sweep.code == 0, sweep.output
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["mode"] == "batched"
    result = dropstudy("rerun", "sw", "--out", "again")
    assert result.code == 0, result.output
    assert "  0: identical" in result.stdout and "  1: identical" in result.stdout
    assert json.loads((tmp_path / "again" / "1" / "provenance.json").read_text())["batch"]["run_dirs"] == ["0", "1"]
    record = json.loads((tmp_path / "again" / "rerun.json").read_text())
    assert record["verdict"] == "identical" and [m["name"] for m in record["members"]] == ["0", "1"]


def test_a_batched_member_rerun_alone_reproduces_it(dropstudy, tmp_path):
    """A member of a batched sweep drew its dropout masks from its own stream, as its single run
    does: rerun alone it reproduces its metrics (to float rounding of the stacked matmuls), and
    the batch is not named as a cause."""
    sweep = dropstudy("sweep", "model.dropout=0.5", "seed=0,1", *SHORT_STUDY, "hydra.sweep.dir=sw")
    assert sweep.code == 0, sweep.output
    assert json.loads((tmp_path / "sw" / "1" / "provenance.json").read_text())["batch"]["members"] == 2
    result = dropstudy("rerun", "sw/1", "--out", "alone", "--rtol", "1e-4")
    assert result.code == 0, result.output
    record = json.loads((tmp_path / "alone" / "rerun.json").read_text())
    assert record["verdict"] in ("identical", "within tolerance"), record
    assert not any(item.startswith("batched:") for item in record["environment_differences"]), record
