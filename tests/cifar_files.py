"""Tiny CIFAR-10 copies in the two real on-disk formats, for tests that cannot download it.

`write_torchvision_layout` writes `cifar-10-batches-py/` exactly as the CIFAR-10 python
release does (pickled dicts of row-major uint8 planes); `write_image_folder` writes
`train/<class>/*.png` and `test/<class>/*.png`. Both return the arrays they wrote, so a test
can compare what the loader decoded with what is on disk.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def tiny_cifar(n_train: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Images as uint8 [N, 32, 32, 3] (HWC, as the release stores them) with labels 0..9."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "test_labels": np.arange(n_test) % 10,
    }


def write_torchvision_layout(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict:
    arrays = tiny_cifar(n_train, n_test, seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        # The release stores each image as 3072 bytes: the R plane, then G, then B.
        data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
        entry = {"batch_label": name, "labels": [int(v) for v in labels], "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(len(images))]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, start=1):
        dump(f"data_batch_{i}", arrays["train_images"][idx], arrays["train_labels"][idx])
    dump("test_batch", arrays["test_images"], arrays["test_labels"])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch": len(chunks[0]), "num_vis": 3072}, f)
    return arrays


def write_image_folder(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0,
                       class_ordered: bool = False) -> dict:
    """PNG files named so that sorting them within a class keeps the written order. class_ordered:
    the labels run class by class (all airplanes, then all automobiles, ...), numbered on across
    classes as real exports are, so file order and class order agree; else they cycle 0..9."""
    arrays = tiny_cifar(n_train, n_test, seed)
    if class_ordered:
        for split, n in (("train", n_train), ("test", n_test)):
            arrays[f"{split}_labels"] = np.arange(n) * 10 // n
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"])):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:05d}.png")
    return arrays
