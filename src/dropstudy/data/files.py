"""Where CIFAR-10 lives on disk: its two layouts, its class folders, and the check that the data
is there before a run directory exists.

Nothing here imports torch, so that a missing dataset is reported as fast as any other bad input
(`dropstudy.data` decodes and loads what these functions find).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class DataError(Exception):
    """The data a config asks for is missing or malformed; the message says what to do."""


def torchvision_files(root: Path) -> list[Path]:
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return [folder / n for n in names]


def image_folder_files(root: Path) -> dict[str, dict[str, list[Path]]]:
    """The image files of each split, per class, in label order. Each split needs exactly one
    non-empty folder per CIFAR-10 class (any case): a missing class would silently train on nine,
    and the images in an unknown folder would silently be left out."""
    expected = f"expected one folder per CIFAR-10 class: {', '.join(CIFAR10_CLASSES)}"
    out: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "test"):
        split_dir = root / split
        # Hidden folders (.ipynb_checkpoints, .thumbnails, ...) are tools' leftovers, not classes.
        folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        by_class: dict[str, list[Path]] = {}
        for folder in folders:
            by_class.setdefault(folder.name.lower(), []).append(folder)
        problems = []
        missing = [c for c in CIFAR10_CLASSES if c not in by_class]
        if missing:
            problems.append(f"missing class folder(s): {', '.join(missing)}")
        unknown = [f.name for f in folders if f.name.lower() not in CIFAR10_CLASSES]
        if unknown:
            problems.append(f"unknown folder(s): {', '.join(unknown)}")
        twice = [" and ".join(f.name for f in same) for same in by_class.values() if len(same) > 1]
        if twice:
            problems.append(f"one class in several folders: {'; '.join(twice)}")
        if problems:
            raise DataError(f"{split_dir}: {'; '.join(problems)} ({expected}).")
        classes = {
            name: sorted(p for p in by_class[name][0].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for name in CIFAR10_CLASSES
        }
        empty = [by_class[name][0].name for name, paths in classes.items() if not paths]
        if empty:
            raise DataError(
                f"{split_dir}: no images in class folder(s): {', '.join(empty)} "
                f"(each class needs {', '.join(sorted(IMAGE_SUFFIXES))} files)."
            )
        out[split] = classes
    return out


def missing_cifar10_message(root: Path) -> str:
    return (
        f"CIFAR-10 was not found under {root} (looked for {root / 'cifar-10-batches-py'}/ and for "
        f"{root / 'train'}/<class>/ + {root / 'test'}/<class>/). Fix it either way: run with "
        "data.download=true to fetch it with torchvision (needs network), or put a copy there yourself "
        "(torchvision's cifar-10-batches-py folder or an image-folder export) and point data.root or "
        "$DROPSTUDY_DATA at it. For a smoke test without the real data: data.synthetic=true."
    )


def cifar10_layout(root: Path) -> str | None:
    """Which on-disk layout holds CIFAR-10 under root: 'torchvision', 'folder' or None."""
    if all(p.is_file() for p in torchvision_files(root)):
        return "torchvision"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder"
    return None


def check_cifar10_available(cfg: DictConfig) -> None:
    """Fail early (before a run directory exists) when the data cannot be had."""
    if cfg.synthetic:
        return
    root = Path(os.path.expanduser(str(cfg.root)))
    layout = cifar10_layout(root)
    if layout is None and not cfg.download:
        raise DataError(missing_cifar10_message(root))
    if layout == "folder":
        image_folder_files(root)  # a missing, empty or unknown class folder


