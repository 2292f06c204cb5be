"""W&B lineage, read back from the offline `.wandb` files that `wandb sync` uploads: each run uses
its data as a dataset artifact (a description with the data's sha256, no copy of the data) and
logs its checkpoint as a model artifact; a rerun uses the model of the run it reproduces; an
artifact that W&B refuses leaves the run and its metrics whole."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import torch
import wandb
from conftest import QUICK_CIFAR, read_jsonl
from wandb_offline import find_run_files, load_run, read_records

from dropstudy.config.compose import compose
from dropstudy.data.datasets import load_dataset
from dropstudy.runs.execute import train_run

QUICK = ["trainer.epochs=4", "trainer.eval_every=2"]


def artifact_records(run_file: Path) -> list:
    """The artifact records of one offline run file, in order."""
    return [r.artifact for r in read_records(run_file) if r.WhichOneof("record_type") == "artifact"]


def artifacts(run_file: Path) -> dict[str, object]:
    """The artifact records of one offline run file, by name (the last of a name)."""
    return {artifact.name: artifact for artifact in artifact_records(run_file)}


def md5_b64(path: Path) -> str:
    """W&B's digest of a file in an artifact's manifest."""
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_a_run_uses_its_data_and_logs_its_checkpoint_as_artifacts(dropstudy, tmp_path: Path):
    result = dropstudy("train", *QUICK, "hydra.run.dir=run")
    assert result.code == 0, result.output
    run = tmp_path / "run"
    (run_file,) = find_run_files(run)
    found = artifacts(run_file)
    run_id = json.loads((run / "summary.json").read_text())["wandb"]["run_id"]
    assert set(found) == {"regression-data", f"model-{run_id}"}

    data = found["regression-data"]
    assert data.type == "dataset" and data.use_after_commit  # an input of the run, not its output
    metadata = json.loads(data.metadata)
    cfg = compose(QUICK)
    assert metadata["sha256"] == load_dataset(cfg.data, torch.device("cpu")).fingerprint()
    assert metadata["sha256"] == json.loads((run / "provenance.json").read_text())["data_sha256"]
    assert metadata["parameters"]["seed"] == cfg.data.seed
    assert [e.path for e in data.manifest.contents] == ["dataset.json"]  # a description, never the data
    assert data.manifest.contents[0].size < 4096

    model = found[f"model-{run_id}"]
    assert model.type == "model" and not model.use_after_commit and set(model.aliases) == {"latest", "final"}
    (entry,) = model.manifest.contents
    assert entry.path == "last.pt" and entry.digest == md5_b64(run / "checkpoints" / "last.pt")
    metadata = json.loads(model.metadata)
    summary = json.loads((run / "summary.json").read_text())
    assert metadata["final"]["val/loss"] == summary["final"]["val/loss"]
    assert metadata["config"]["model.dropout"] == 0.5 and metadata["status"] == "finished"


def test_cifar10_data_is_a_reference_to_its_folder_not_a_copy(dropstudy, tmp_path: Path):
    from cifar_files import write_torchvision_layout  # the real file layout, a few images

    root = tmp_path / "cifar"
    write_torchvision_layout(root)
    result = dropstudy("train", *QUICK_CIFAR, "trainer.epochs=1", f"data.root={root}", "data.verify=false",
                       "hydra.run.dir=run")
    assert result.code == 0, result.output
    data = artifacts(find_run_files(tmp_path / "run")[0])["cifar10-data"]
    refs = {e.path: e.ref for e in data.manifest.contents if e.path != "dataset.json"}
    assert refs["files/cifar-10-batches-py/data_batch_1"] == (root / "cifar-10-batches-py" / "data_batch_1").resolve().as_uri()
    assert all(ref.startswith(root.resolve().as_uri() + "/") for ref in refs.values())
    assert json.loads(data.metadata)["sha256"] == json.loads(
        (tmp_path / "run" / "provenance.json").read_text())["data_sha256"]


def test_a_rerun_uses_the_model_of_the_run_it_reproduces(dropstudy, tmp_path: Path):
    assert dropstudy("train", *QUICK, "hydra.run.dir=first").code == 0
    first_id = json.loads((tmp_path / "first" / "summary.json").read_text())["wandb"]["run_id"]
    checkpoint = (tmp_path / "first" / "checkpoints" / "last.pt").read_bytes()
    rerun = dropstudy("rerun", "first", "--out", "again")
    assert rerun.code == 0, rerun.output
    found = artifacts(find_run_files(tmp_path / "again")[0])
    used = found[f"model-{first_id}"]
    assert used.use_after_commit and used.type == "model"
    assert used.manifest.contents[0].digest == base64.b64encode(hashlib.md5(checkpoint).digest()).decode()


@pytest.mark.slow  # a run long enough to interrupt, then its resume
def test_a_resume_uses_the_model_its_interrupted_run_logged(clean_env, tmp_path: Path, dropstudy):
    from test_resume import LONG, start, stop_once_it_logs

    run = tmp_path / "run"
    said = stop_once_it_logs(start(tmp_path, clean_env, "train", *LONG, "hydra.run.dir=run"), run / "metrics.jsonl")
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted", said
    run_id = json.loads((run / "summary.json").read_text())["wandb"]["run_id"]
    stopped_at = md5_b64(run / "checkpoints" / "last.pt")
    first, = find_run_files(run)
    logged = artifacts(first)[f"model-{run_id}"]
    assert set(logged.aliases) == {"latest", "interrupted"} and logged.manifest.contents[0].digest == stopped_at

    resumed = dropstudy("resume", "run")
    assert resumed.code == 0, resumed.output
    second = next(f for f in find_run_files(run) if f != first)  # the same W&B run id, a second offline file
    models = [a for a in artifact_records(second) if a.name == f"model-{run_id}"]
    # First the checkpoint it starts from, as an input; last the finished model, as the output.
    assert [m.use_after_commit for m in models] == [True, False]
    assert models[0].manifest.contents[0].digest == stopped_at
    assert models[1].manifest.contents[0].digest == md5_b64(run / "checkpoints" / "last.pt") != stopped_at


def test_a_refused_artifact_loses_no_metric(clean_env, tmp_path: Path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise ConnectionError("artifact storage is down")

    monkeypatch.setattr(wandb.Artifact, "add_file", refuse)
    result = train_run(compose([*QUICK, "tracker.mode=offline"]), tmp_path / "run", [])
    assert result.status == "finished"
    offline = load_run(tmp_path / "run")
    local = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val/loss" in r]
    assert offline.scalars("val/loss") == [r["val/loss"] for r in local]
    assert offline.exit_code == 0 and offline.summary["status"] == "finished"
    assert not artifacts(offline.path)  # both refused (a file is added to each), and said so
