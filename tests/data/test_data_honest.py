"""Data a run can trust: `data.subset` is a class-stratified random sample whatever the file order
on disk, the run records its class counts, the decoded-tensor cache follows every change that
alters the tensors, and a malformed image-folder export stops before a run directory exists."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_files import CLASSES, write_image_folder
from conftest import QUICK_CIFAR
from omegaconf import OmegaConf
from PIL import Image
from typer.testing import CliRunner
from wandb_offline import load_run

from dropstudy.cli import app
from dropstudy.data.datasets import load_cifar10, load_dataset, read_cifar10
from dropstudy.data.files import DataError, check_cifar10_available


def data_cfg(root: Path, **overrides) -> OmegaConf:
    base = {"name": "cifar10", "root": str(root), "download": False, "subset": None, "synthetic": False,
            "val_size": 40, "verify": False, "seed": 0}
    base.update(overrides)
    return OmegaConf.create(base)


def quiet(_: str) -> None:
    pass


def file_indices(images: torch.Tensor, arrays: dict) -> list[int]:
    """Which written training file (its index, in file order) each decoded image is."""
    index = {img.tobytes(): i for i, img in enumerate(arrays["train_images"])}
    return sorted(index[x.permute(1, 2, 0).numpy().tobytes()] for x in images)


def test_subset_of_a_class_ordered_export_is_stratified_random_and_fixed_by_the_seed(tmp_path):
    # 30 images per class, written class by class: the first 60 files are airplanes and automobiles.
    arrays = write_image_folder(tmp_path, n_train=300, n_test=20, class_ordered=True)
    labels = arrays["train_labels"]
    n = 60
    data, same_seed, other_seed = (load_cifar10(data_cfg(tmp_path, subset=n, seed=seed), torch.device("cpu"), quiet)
                                   for seed in (0, 0, 1))
    counts = data.class_counts()
    remaining = {c: 30 - counts["val"][c] for c in CLASSES}
    assert sum(counts["train"].values()) == n
    for c in CLASSES:  # each class in proportion to its share of the images left after validation
        assert abs(counts["train"][c] - n * remaining[c] / sum(remaining.values())) < 1, (c, counts)

    picked, held_out = file_indices(data.train.inputs, arrays), set(file_indices(data.val.inputs, arrays))
    first_of_each_class = []
    for c in range(10):
        mine = [i for i in picked if labels[i] == c]
        first_of_each_class.append(mine == [i for i in np.flatnonzero(labels == c) if i not in held_out][: len(mine)])
    assert not all(first_of_each_class), "within each class the subset must be random, not the first files"

    assert torch.equal(same_seed.train.inputs, data.train.inputs)  # the same data.seed, the same subset
    assert file_indices(other_seed.train.inputs, arrays) != picked  # another data.seed, another subset


def test_run_records_class_counts_in_summary_wandb_config_and_log(dropstudy, tmp_path):
    root = tmp_path / "cifar"
    write_image_folder(root, n_train=200, n_test=50, class_ordered=True)
    result = dropstudy("train", *QUICK_CIFAR, f"data.root={root}", "data.subset=50", "trainer.epochs=1",
                       "hydra.run.dir=run")
    assert result.code == 0, result.output
    counts = json.loads((tmp_path / "run" / "summary.json").read_text())["class_counts"]
    assert counts["test"] == {c: 5 for c in CLASSES}
    assert sum(counts["val"].values()) == 40 and sum(counts["train"].values()) == 50
    remaining = {c: 20 - counts["val"][c] for c in CLASSES}
    for c in CLASSES:  # first-50-in-file-order would be 15 airplanes, 15 automobiles, ...
        assert abs(counts["train"][c] - 50 * remaining[c] / 160) < 1, counts
    config = load_run(tmp_path / "run").config
    for split, per_class in counts.items():
        for c, k in per_class.items():
            assert config[f"data.class_counts.{split}.{c}"] == k
    line = "class counts (train/val/test): " + ", ".join(
        f"{c} {counts['train'][c]}/{counts['val'][c]}/{counts['test'][c]}" for c in CLASSES)
    assert result.output.count(line) == 1


def test_regression_data_has_no_class_counts():
    cfg = OmegaConf.create({"name": "regression", "n_points": 10, "slope": 1.5, "train_noise": 0.5,
                            "test_noise": 0.3, "seed": 0})
    assert load_dataset(cfg, torch.device("cpu"), quiet).class_counts() == {}


def swap_folders(a: Path, b: Path) -> None:
    tmp = a.with_name("swap-tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_relabelled_folders_rebuild_the_cache(tmp_path):
    # The hard case for a key made of file metadata: every class folder holds the same names, every
    # file has one size (uncompressed PNGs) and one mtime (as unpacked from an archive), so swapping
    # two folders' names leaves each file's relative path, size and mtime as they were.
    rng = np.random.default_rng(0)
    written: dict[tuple[str, str], set[bytes]] = {}
    for split in ("train", "test"):
        for c in CLASSES:
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
            for i, img in enumerate(images):
                Image.fromarray(img).save(folder / f"{i:04d}.png", compress_level=0)
                os.utime(folder / f"{i:04d}.png", ns=(1_700_000_000 * 10**9,) * 2)
            written[split, c] = {img.tobytes() for img in images}
    read_cifar10(tmp_path, download=False, verify=False, log=quiet)
    for split in ("train", "test"):  # mv cat t; mv dog cat; mv t dog
        swap_folders(tmp_path / split / "cat", tmp_path / split / "dog")
    tensors, source = read_cifar10(tmp_path, download=False, verify=False, log=quiet)
    assert "cached" not in source
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        for now, was in (("dog", "cat"), ("cat", "dog")):
            decoded = {x.permute(1, 2, 0).numpy().tobytes() for x in images[labels == CLASSES.index(now)]}
            assert decoded == written[split, was]


def test_cache_hash_notices_an_edit_that_keeps_size_and_mtime(tmp_path):
    write_image_folder(tmp_path, n_train=20, n_test=10)
    path = next((tmp_path / "train" / "cat").iterdir())
    rng = np.random.default_rng(5)
    # Stored uncompressed, every 32x32 RGB PNG has the same size.
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, compress_level=0)
    read_cifar10(tmp_path, download=False, verify=False, log=quiet, content_hash=True)
    before = path.stat()
    edited = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(edited).save(path, compress_level=0)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    tensors, source = read_cifar10(tmp_path, download=False, verify=False, log=quiet, content_hash=True)
    assert "cached" not in source
    assert any(np.array_equal(x.permute(1, 2, 0).numpy(), edited) for x in tensors["train_images"])


@pytest.mark.parametrize("command", ["train", "study"])
def test_missing_class_folder_stops_before_a_run_directory(dropstudy, tmp_path, command):
    root = tmp_path / "cifar"
    write_image_folder(root, n_train=40, n_test=20)
    for path in (root / "train" / "dog").iterdir():
        path.unlink()
    (root / "train" / "dog").rmdir()
    args = [command, "experiment=cifar10", f"data.root={root}", "hydra.run.dir=run"]
    if command == "train":  # the real process: its exit code and everything it prints
        result = dropstudy(*args)
        code, output = result.code, result.output
    else:  # in-process (faster), where an escaping exception would show as exit code 1
        result = CliRunner().invoke(app, args, prog_name="dropstudy")
        code, output = result.exit_code, result.output
    assert code == 2, output
    assert f"{root / 'train'}: missing class folder(s): dog (expected one folder per CIFAR-10 class: airplane" in (
        " ".join(output.split()))
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,message", [
    ("empty", "no images in class folder(s): cat"),
    ("unknown", "unknown folder(s): kitten"),
    ("twice", "one class in several folders: Cat and cat"),
])
def test_empty_unknown_or_doubled_class_folder_is_refused_by_the_early_check(tmp_path, change, message):
    write_image_folder(tmp_path, n_train=40, n_test=20)
    test_cat = tmp_path / "test" / "cat"
    if change == "empty":
        for path in test_cat.iterdir():
            path.unlink()
    else:
        (test_cat.parent / ("kitten" if change == "unknown" else "Cat")).mkdir()
    with pytest.raises(DataError, match=rf"^{tmp_path / 'test'}: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        check_cifar10_available(data_cfg(tmp_path))


def test_unwritable_cache_warns_once_trains_on_and_leaves_no_tmp(tmp_path, caplog):
    write_image_folder(tmp_path, n_train=20, n_test=10)
    cache = tmp_path / "dropstudy-cifar10-folder.pt"
    cache.mkdir()  # the atomic rename onto it fails (permission bits would not stop root)
    with caplog.at_level(logging.WARNING, logger="dropstudy"):
        tensors, _ = read_cifar10(tmp_path, download=False, verify=False, log=quiet)
    assert len(tensors["train_labels"]) == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"could not write the cache {cache}" in warnings[0] and "\n" not in warnings[0]
    assert not list(tmp_path.glob("*.tmp"))
