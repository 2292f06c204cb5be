"""CIFAR-10 through the real loading code: torchvision's batch files and image folders written
in their real formats (tiny), the uint8 cache, the validation split, and end-to-end training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cifar_files import write_image_folder, write_torchvision_layout
from conftest import QUICK_CIFAR, read_figure, read_jsonl
from omegaconf import OmegaConf

from dropstudy.data.datasets import load_cifar10, read_cifar10
from dropstudy.data.files import DataError


def data_cfg(root: Path, **overrides) -> OmegaConf:
    base = dict(name="cifar10", root=str(root), download=False, subset=None, synthetic=False,
                val_size=40, verify=False, seed=0)
    base.update(overrides)
    return OmegaConf.create(base)


@pytest.mark.parametrize("writer,layout", [(write_torchvision_layout, "torchvision"), (write_image_folder, "folder")])
def test_both_layouts_decode_to_what_was_written_and_cache(tmp_path, writer, layout):
    arrays = writer(tmp_path, n_train=120, n_test=30)
    messages: list[str] = []
    tensors, source = read_cifar10(tmp_path, download=False, verify=False, log=messages.append)
    assert layout in source and "cached" not in source
    assert (tmp_path / f"dropstudy-cifar10-{layout}.pt").is_file()
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
        expected = torch.from_numpy(arrays[f"{split}_images"]).permute(0, 3, 1, 2)
        if layout == "folder":  # files are read class by class: compare as a set of (image, label)
            got = {(int(label), images[i].numpy().tobytes()) for i, label in enumerate(labels)}
            want = {(int(label), expected[i].numpy().tobytes()) for i, label in enumerate(arrays[f"{split}_labels"])}
            assert got == want
        else:
            assert torch.equal(images, expected)
            assert labels.tolist() == list(arrays[f"{split}_labels"])
    again, source = read_cifar10(tmp_path, download=False, verify=False, log=messages.append)
    assert "cached" in source
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_torchvision_md5_check_is_kept_by_default(tmp_path):
    write_torchvision_layout(tmp_path, n_train=50, n_test=10)
    with pytest.raises(DataError, match="data.verify=false"):
        read_cifar10(tmp_path, download=False, verify=True, log=lambda _: None)


def test_changed_files_invalidate_the_cache(tmp_path):
    write_torchvision_layout(tmp_path, n_train=50, n_test=10, seed=0)
    first, _ = read_cifar10(tmp_path, download=False, verify=False, log=lambda _: None)
    write_torchvision_layout(tmp_path, n_train=60, n_test=10, seed=1)
    second, source = read_cifar10(tmp_path, download=False, verify=False, log=lambda _: None)
    assert "cached" not in source and len(second["train_labels"]) == 60


def test_wrong_image_size_names_the_file(tmp_path):
    write_image_folder(tmp_path, n_train=20, n_test=10)
    from PIL import Image

    bad = tmp_path / "train" / "cat" / "big.png"
    Image.new("RGB", (64, 64)).save(bad)
    with pytest.raises(DataError, match="big.png"):
        read_cifar10(tmp_path, download=False, verify=False, log=lambda _: None)


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    write_torchvision_layout(tmp_path, n_train=200, n_test=20)
    a = load_cifar10(data_cfg(tmp_path), torch.device("cpu"), log=lambda _: None)
    b = load_cifar10(data_cfg(tmp_path), torch.device("cpu"), log=lambda _: None)
    c = load_cifar10(data_cfg(tmp_path, seed=1), torch.device("cpu"), log=lambda _: None)
    assert len(a.train) == 160 and len(a.val) == 40 and len(a.test) == 20
    assert torch.equal(a.val.inputs, b.val.inputs)
    assert not torch.equal(a.val.inputs, c.val.inputs)
    train_rows = {x.numpy().tobytes() for x in a.train.inputs}
    assert not any(x.numpy().tobytes() in train_rows for x in a.val.inputs)
    sub = load_cifar10(data_cfg(tmp_path, subset=50), torch.device("cpu"), log=lambda _: None)
    assert len(sub.train) == 50 and torch.equal(sub.val.inputs, a.val.inputs)
    assert {x.numpy().tobytes() for x in sub.train.inputs} <= train_rows  # drawn from the same remaining images


@pytest.mark.parametrize("writer", [write_torchvision_layout,
                                    pytest.param(write_image_folder, marks=pytest.mark.slow)])
def test_train_cifar10_end_to_end_on_real_formats(dropstudy, tmp_path, writer):
    root = tmp_path / "cifar"
    writer(root, n_train=200, n_test=40)
    result = dropstudy("train", *QUICK_CIFAR, f"data.root={root}", "data.verify=false", "hydra.run.dir=run")
    assert result.code == 0, result.output
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["synthetic_data"] is False
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "gap/loss", "test/loss", "test/acc"):
        assert key in summary["final"], key
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows if "val/loss" in r] == [1, 2]
    assert 0.0 <= summary["final"]["test/acc"] <= 1.0
    read_figure(run / "plots" / "learning_curves.png")
    assert "cpu" in result.output  # it says which device it uses


@pytest.mark.slow
def test_synthetic_data_runs_and_is_labelled(dropstudy, tmp_path):
    result = dropstudy("train", "experiment=cifar10", "data.synthetic=true", "trainer.epochs=1",
                       "data.subset=256", "data.val_size=64", "hydra.run.dir=run")
    assert result.code == 0, result.output
    assert "SYNTHETIC" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["synthetic_data"] is True
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert "SYNTHETIC" in provenance["data"]


def test_bad_data_found_late_leaves_a_failed_summary(dropstudy, tmp_path):
    # The files exist (the early check passes) but fail torchvision's MD5 check when read.
    write_torchvision_layout(tmp_path / "d", n_train=50, n_test=10)
    result = dropstudy("train", "experiment=cifar10", f"data.root={tmp_path / 'd'}",
                       "tracker.mode=disabled", "hydra.run.dir=run")
    assert result.code == 2, result.output
    assert "cifar-10-batches-py" in result.stderr and "data.verify=false" in result.stderr
    assert "Traceback" not in result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"
