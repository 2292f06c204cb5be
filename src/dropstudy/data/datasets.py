"""The datasets of the studies, held as tensors: the regression points and CIFAR-10.

CIFAR-10 is read once from either torchvision's `cifar-10-batches-py/` folder or an
image-folder export (`train/<class>/*.png`, `test/<class>/*.png`), decoded to one uint8 tensor
per split and cached next to the data, so later runs load it in about a second. The splits
then live on the training device; `TrainBatches` shuffles with `randperm` on that device and
indexes batches out of them (optionally cropped and flipped there, `augment_images`): no
DataLoader, no per-image transform and no host-to-device copy in the loop. On an accelerator the
images are normalised once when loaded (`normalises_once`); on a CPU each batch is.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig

from dropstudy.data.files import (
    CIFAR10_CLASSES,
    DataError,
    cifar10_layout,
    image_folder_files,
    missing_cifar10_message,
    torchvision_files,
)
from dropstudy.store.failures import describe, writing

# Per-channel statistics of the CIFAR-10 training set, the values the tutorials normalise with.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CACHE_VERSION = 2


@dataclass
class Split:
    """Examples of one split: `base_inputs`/`base_targets` whole, or, with `index`, the rows
    `index` of a larger set (one copy of the images shared by the splits of members that differ
    in data.seed). Batches gather their rows (`take`, `slice`); `inputs`/`targets` give the split's
    own examples (a copy when it is rows of a shared set)."""

    base_inputs: torch.Tensor  # regression: float [N, 1]; CIFAR-10: uint8 [N, 3, 32, 32]
    base_targets: torch.Tensor  # regression: float [N, 1]; CIFAR-10: int64 [N]
    index: torch.Tensor | None = None  # rows of the base tensors that make the split (None: all)

    @property
    def inputs(self) -> torch.Tensor:
        return self.base_inputs if self.index is None else self.base_inputs[self.index]

    @property
    def targets(self) -> torch.Tensor:
        return self.base_targets if self.index is None else self.base_targets[self.index]

    def __len__(self) -> int:
        return len(self.base_targets) if self.index is None else len(self.index)

    @property
    def device(self) -> torch.device:
        return self.base_targets.device

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's examples at positions `rows` (a gather, on the device)."""
        if self.index is not None:
            rows = self.index[rows]
        return self.base_inputs[rows], self.base_targets[rows]

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples start..stop-1 in order: views without an index, a gather with one."""
        if self.index is None:
            return self.base_inputs[start:stop], self.base_targets[start:stop]
        rows = self.index[start:stop]
        return self.base_inputs[rows], self.base_targets[rows]

    def to(self, device: torch.device) -> "Split":
        index = None if self.index is None else self.index.to(device)
        return Split(_to(self.base_inputs, device), _to(self.base_targets, device), index=index)


@dataclass
class Dataset:
    """Train/val/test splits on one device, and how raw inputs become model inputs."""

    task: str  # "regression" or "classification"
    train: Split
    val: Split
    test: Split
    source: str  # where the data came from, for provenance and logs
    synthetic: bool = False
    classes: tuple[str, ...] = ()
    prepare: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    augment: bool = False  # crop and flip training batches (data.augment; images only)
    # A black pixel as the inputs hold it, per channel: what augmentation pads with (None: zeros).
    blank: torch.Tensor | None = None
    # The fingerprint of the data as loaded, kept when the inputs are normalised in place.
    sha256: str | None = None
    # The training data evaluated in eval mode (dropout off) beside validation, for an unbiased
    # train-val gap: a fixed subset of `train` the size of `val` where the training split is large
    # (CIFAR-10, `eval_subset`), else the whole training split (None here means that).
    train_eval: Split | None = None

    def __post_init__(self) -> None:
        if self.train_eval is None:
            self.train_eval = self.train

    def fingerprint(self) -> str:
        """sha256 of every tensor the run trains and evaluates on, as loaded (before any
        normalisation the device copy has had): the data actually used, whatever the device
        keeps. `train_eval` is drawn from `train` and data.seed alone, so the training split
        stands for it."""
        if self.sha256 is not None:
            return self.sha256
        digest = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for tensor in split.slice(0, len(split)):
                digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
                digest.update(tensor.detach().cpu().contiguous().numpy())  # its buffer, not a copy
        return digest.hexdigest()

    def describe(self) -> str:
        return f"{self.source}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test"

    def train_batches(self, batch_size: int | None, seed: int) -> "TrainBatches":
        """The training split's shuffled batches for a run seeded with `seed` (augmented with
        data.augment)."""
        return TrainBatches(self.train, batch_size, seed, augment=self.augment, blank=self.blank)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split ({"train": {"airplane": n, ...}, ...}); empty for data
        without classes (regression)."""
        if not self.classes:
            return {}
        counts = {}
        for name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            per_class = torch.bincount(split.targets.cpu(), minlength=len(self.classes)).tolist()
            counts[name] = dict(zip(self.classes, per_class))
        return counts

    def describe_class_counts(self) -> str:
        """One line: each class's train/val/test counts."""
        counts = self.class_counts()
        return "class counts (train/val/test): " + ", ".join(
            f"{c} {counts['train'][c]}/{counts['val'][c]}/{counts['test'][c]}" for c in self.classes
        )


def batches(split: Split, batch_size: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, in slices of batch_size (views, no copies): for evaluation."""
    n = len(split)
    step = n if batch_size is None else batch_size
    for start in range(0, n, max(step, 1)):
        yield split.slice(start, start + step)


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on `device`, so that drawing from it needs no host round trip; CPU where the
    device has none."""
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:
        return torch.Generator().manual_seed(seed)


# Augmentation draws from its own stream, so turning it on leaves the batch order unchanged.
AUGMENT_SEED_OFFSET = 1_000_003


class TrainBatches:
    """The training split in shuffled minibatches, one pass per epoch.

    The order is a `randperm` drawn on the split's device from a generator seeded with the run
    seed alone (not shared with dropout or initialisation), so it depends on nothing else.
    `state`/`load_state` carry the generators through a checkpoint: a resumed run draws the same
    orders and crops as one that never stopped.
    """

    def __init__(self, split: Split, batch_size: int | None, seed: int, augment: bool = False,
                 blank: torch.Tensor | None = None):
        self.split = split
        self.batch_size = batch_size
        self.blank = blank
        device = split.device
        self.shuffle = device_generator(device, seed)
        self.crops = device_generator(device, seed + AUGMENT_SEED_OFFSET) if augment else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        split, n = self.split, len(self.split)
        if self.batch_size is None or self.batch_size >= n:
            batches_ = [split.slice(0, n)]
        else:
            order = torch.randperm(n, generator=self.shuffle, device=self.shuffle.device)
            order = order.to(split.device)
            batches_ = (split.take(idx) for idx in order.split(self.batch_size))
        for xb, yb in batches_:
            yield (augment_images(xb, self.crops, blank=self.blank) if self.crops is not None else xb), yb

    def state(self) -> dict[str, torch.Tensor]:
        out = {"shuffle": self.shuffle.get_state()}
        if self.crops is not None:
            out["augment"] = self.crops.get_state()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.shuffle.set_state(state["shuffle"])
        if self.crops is not None and "augment" in state:
            self.crops.set_state(state["augment"])


def augment_images(images: torch.Tensor, generator: torch.Generator, pad: int = 4,
                   blank: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop with padding `pad` and random horizontal flip, per image, for a whole batch
    [B, C, H, W] at once on its device (torchvision's RandomCrop(32, padding=4) and
    RandomHorizontalFlip, without a Python loop over images). The padding is black: zeros of a
    uint8 batch, or `blank` (per channel) for images already normalised."""
    b, c, h, w = images.shape
    device = images.device

    def draw(high: int) -> torch.Tensor:
        return torch.randint(0, high, (b,), generator=generator, device=generator.device).to(device)

    dy, dx, flip = draw(2 * pad + 1), draw(2 * pad + 1), draw(2).bool()
    if blank is None:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    else:
        padded = blank.view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad : pad + h, pad : pad + w] = images
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]  # [B, 1, H, 1]
    cols = dx[:, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


# --------------------------------------------------------------------------- regression


def make_regression(cfg: DictConfig) -> Dataset:
    """10 points evenly spaced on [-1, 1], y = slope*x + Gaussian noise, drawn from data.seed."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    x = torch.linspace(-1.0, 1.0, int(cfg.n_points)).unsqueeze(1)

    def noisy(std: float) -> torch.Tensor:
        return cfg.slope * x + std * torch.randn(x.shape, generator=g)

    # Drawn in this order so the train and test sets are those of the classic demo; the
    # validation draw comes last and changes neither.
    train = Split(x, noisy(cfg.train_noise))
    test = Split(x.clone(), noisy(cfg.test_noise))
    val = Split(x.clone(), noisy(cfg.test_noise))
    return Dataset("regression", train, val, test, source="regression (generated)")


# --------------------------------------------------------------------------- CIFAR-10


def _normalizer(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1) * 255

    def prepare(images: torch.Tensor) -> torch.Tensor:
        # In place on the float copy: no second temporary, which matters for a whole split.
        return images.to(torch.float32, copy=True).sub_(mean).div_(std)

    return prepare


def synthetic_cifar10(n_train: int, n_test: int, seed: int) -> dict:
    """CIFAR-shaped random images whose mean colour depends on the label, so a model can learn
    something and the curves move; for smoke tests and benchmarks only."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(96, 160, (10, 3, 1, 1), generator=g, dtype=torch.int16)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.empty((n, 3, 32, 32), dtype=torch.uint8)
        for start in range(0, n, 4096):  # in chunks, in int16: peak memory stays small
            part = labels[start : start + 4096]
            noise = torch.randint(-96, 97, (len(part), 3, 32, 32), generator=g, dtype=torch.int16)
            images[start : start + 4096] = (palette[part] + noise).clamp_(0, 255).to(torch.uint8)
        return images, labels

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return {"train_images": train_x, "train_labels": train_y, "test_images": test_x, "test_labels": test_y}


def _cache_key(root: Path, layout: str, sources: list[Path], content_hash: bool) -> str:
    """A digest of everything that determines the decoded tensors: the cache format, the layout,
    each source file's path relative to root (an image's class folder is its label), size and
    mtime in ns, and the mtimes of the folders holding them, which a rename inside them changes
    (swapping two class folders keeps every file's path, size and mtime when the folders hold
    the same names). With content_hash also each file's bytes, for copies that keep all those."""
    digest = hashlib.sha256(f"{CACHE_VERSION}\0{layout}\0{content_hash}\0".encode())
    # Relative paths by slicing, and os.stat on strings: at 60,000 files Path.relative_to and
    # Path.stat cost more than the stat calls themselves. str(root / "_") spells root's prefix as
    # the joined paths do, even for root ".".
    prefix = len(str(root / "_")) - 1
    folders = {path.parent for path in sources}
    folders |= {folder.parent for folder in folders if folder.parent != root}  # the split folders
    for folder in sorted(map(str, folders)):
        digest.update(f"{folder[prefix:]}/\0{os.stat(folder).st_mtime_ns}\0".encode())
    for path in sorted(map(str, sources)):
        st = os.stat(path)
        digest.update(f"{path[prefix:]}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if content_hash:
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _decode_image_folder(files: dict[str, dict[str, list[Path]]]) -> dict:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    tensors = {}
    for split, classes in files.items():
        images, labels = [], []
        for name, paths in classes.items():
            label = CIFAR10_CLASSES.index(name)
            for path in paths:
                try:
                    with Image.open(path) as img:
                        pixels = np.asarray(img.convert("RGB"))
                except (OSError, UnidentifiedImageError) as exc:
                    raise DataError(f"{path}: cannot be decoded as an image ({exc}).") from exc
                if pixels.shape != (32, 32, 3):
                    raise DataError(f"{path}: CIFAR-10 images are 32x32 RGB; this one is {pixels.shape[1]}x{pixels.shape[0]}.")
                images.append(pixels)
                labels.append(label)
        stacked = np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8)
        tensors[f"{split}_images"] = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
        tensors[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    return tensors


def _decode_torchvision(root: Path, verify: bool) -> dict:
    from torchvision.datasets import CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        # torchvision checks the MD5 of every batch file and of batches.meta; a hand-made copy
        # (e.g. the tiny datasets the tests write) fails that check, so data.verify=false asks
        # only that the files exist (torchvision treats md5=None that way).
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    cls = CIFAR10 if verify else UncheckedCIFAR10
    tensors = {}
    for split, train in (("train", True), ("test", False)):
        names = [n for n, _ in (CIFAR10.train_list if train else CIFAR10.test_list)] + [CIFAR10.meta["filename"]]
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError as exc:
            raise DataError(
                f"{root / 'cifar-10-batches-py'}: torchvision rejected it ({exc}). If this is a hand-made copy, data.verify=false skips "
                "the MD5 check; otherwise delete the folder and use data.download=true."
            ) from exc
        except Exception as exc:  # a file that passed (or skipped) the MD5 check but is not a batch file
            raise DataError(_malformed_batch(root / CIFAR10.base_folder, names, exc)) from exc
        if len(ds.data) != len(ds.targets):  # torchvision reads images and labels apart
            raise DataError(_malformed_batch(root / CIFAR10.base_folder, names, ValueError("images and labels differ in number")))
        tensors[f"{split}_images"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        tensors[f"{split}_labels"] = torch.tensor(ds.targets, dtype=torch.int64)
    return tensors


def _malformed_batch(folder: Path, names: list[str], exc: Exception) -> str:
    """The message for a batch file torchvision could not read: the first of `names` that is not
    what the CIFAR-10 python release holds, and what is wrong with it."""
    import pickle

    import numpy as np

    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except Exception as error:
            return f"{path}: not a CIFAR-10 batch file (cannot be unpickled: {type(error).__name__}: {error})."
        if not isinstance(entry, dict):
            return f"{path}: not a CIFAR-10 batch file (it holds a {type(entry).__name__}, not a dict)."
        wanted = ("label_names",) if name == "batches.meta" else ("data", "labels")
        missing = [k for k in wanted if k not in entry and not (k == "labels" and "fine_labels" in entry)]
        if missing:
            return f"{path}: not a CIFAR-10 batch file (no {' or '.join(repr(k) for k in missing)} entry)."
        if name == "batches.meta":
            continue
        data, labels = np.asarray(entry["data"]), entry.get("labels", entry.get("fine_labels"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            return (f"{path}: not a CIFAR-10 batch file ('data' is {data.dtype} of shape {tuple(data.shape)}; "
                    "expected uint8 rows of 3072 values, one 32x32 RGB image each).")
        if len(labels) != len(data):
            return f"{path}: not a CIFAR-10 batch file ({len(data)} images but {len(labels)} labels)."
    return f"{folder}: torchvision could not read it ({type(exc).__name__}: {exc})."


def read_cifar10(
    root: Path, download: bool, verify: bool, log: Callable[[str], None], content_hash: bool = False
) -> tuple[dict, str]:
    """uint8 image tensors of both splits, from the cache when its key matches the source files
    (`_cache_key`; content_hash: data.cache_hash)."""
    layout = cifar10_layout(root)
    if layout is None:
        if not download:
            raise DataError(missing_cifar10_message(root))
        from torchvision.datasets import CIFAR10

        log(f"downloading CIFAR-10 to {root} ...")
        try:
            root.mkdir(parents=True, exist_ok=True)
            CIFAR10(str(root), train=True, download=True)
        except Exception as exc:  # URLError, HTTP errors, checksum failures: all mean "no data"
            raise DataError(
                f"could not download CIFAR-10 to {root}: {exc}. Without network, put a copy there yourself "
                "(torchvision's cifar-10-batches-py folder or an image-folder export), or use data.synthetic=true."
            ) from exc
        layout = "torchvision"

    if layout == "torchvision":
        sources = torchvision_files(root)
        folder_files = None
    else:
        folder_files = image_folder_files(root)
        sources = [p for classes in folder_files.values() for paths in classes.values() for p in paths]
    key = _cache_key(root, layout, sources, content_hash)
    cache = root / f"dropstudy-cifar10-{layout}.pt"
    # Only the torchvision layout has checksums; a cache decoded without checking them
    # (data.verify=false) is not trusted by a run that asks for the check.
    checked = verify and layout == "torchvision"
    if cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            if cached.get("key") == key and (cached.get("verified") is True or not checked):
                return cached["tensors"], f"CIFAR-10 ({layout} layout, cached in {cache})"
            if cached.get("key") == key:
                log(f"the cache {cache} was decoded without data.verify's MD5 check; checking the files now")
        except Exception:
            pass  # unreadable or stale cache: decode again and overwrite it
    log(f"decoding CIFAR-10 from {root} ({layout} layout) once; caching the tensors in {cache}")
    tensors = _decode_torchvision(root, verify) if layout == "torchvision" else _decode_image_folder(folder_files)
    write_cache(cache, {"key": key, "tensors": tensors, "verified": checked})
    return tensors, f"CIFAR-10 ({layout} layout, {root})"


def write_cache(cache: Path, entry: dict) -> None:
    """Write the cache atomically, or warn in one line and go on: a read-only or full data
    directory still trains, only the next run decodes again. The temporary file is per process
    (concurrent runs never write one file) and is removed when the write fails."""
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    # Serialised in memory first: torch's own file writer reports a full disk or a size limit as
    # a RuntimeError without errno, Python's write as the OSError that says why.
    buffer = io.BytesIO()
    torch.save(entry, buffer)
    try:
        with writing(cache, tmp=tmp):
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
            os.replace(tmp, cache)
    except OSError as exc:
        logging.getLogger("dropstudy").warning(
            f"could not write the cache {cache}: {describe(exc)} Training goes on; the next run decodes again.")


def stratified_subset(candidates: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """n of `candidates` (indices in random order; `labels` theirs), each class in proportion to
    its share of them: floor(n * share) per class, then one more for the classes with the largest
    remainders (ties to the lower label) until the total is exactly n. The first of each class in
    the random order are taken, so within a class it is a uniform random sample."""
    n = min(n, len(candidates))
    classes, counts = torch.unique(labels, return_counts=True)
    classes, counts = classes.tolist(), counts.tolist()
    quotas = [n * k // len(candidates) for k in counts]
    remainders = [n * k % len(candidates) for k in counts]
    for i in sorted(range(len(classes)), key=lambda i: (-remainders[i], classes[i]))[: n - sum(quotas)]:
        quotas[i] += 1
    return torch.cat([candidates[labels == c][:q] for c, q in zip(classes, quotas)])


# The eval-mode training subset draws from its own stream, so it leaves the val and train draws as they were.
EVAL_SUBSET_SEED_OFFSET = 2_000_003


def eval_subset(train_labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Positions in the training split of the `n` images evaluated in eval mode at every
    evaluation (`Dataset.train_eval`): a class-stratified random sample drawn from data.seed, so
    every arm and seed of a study that shares the data sees the same images, and it costs what
    validation (n images) costs; sorted, in the split's order."""
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed + EVAL_SUBSET_SEED_OFFSET))
    return stratified_subset(order, train_labels[order], n).sort().values


def load_cifar10(cfg: DictConfig, device: torch.device, log: Callable[[str], None] = print,
                 shared: dict[Any, Any] | None = None) -> Dataset:
    """Train/val/test CIFAR-10 on `device`. The validation images are drawn from the training
    set with data.seed; data.subset then draws a class-stratified random sample of the remaining
    training images with the same seed, so the order of the files on disk never matters.

    The splits are rows (`Split.index`) of one copy of the images on the device; `shared` (one
    dict per batch of members) keeps that copy, so members that differ in data.seed share it."""
    root = Path(os.path.expanduser(str(cfg.root)))
    shared = {} if shared is None else shared
    if cfg.synthetic:
        n_train = 50_000 if cfg.subset is None else max(int(cfg.subset) + int(cfg.val_size), 2)
        n_test = 10_000 if cfg.subset is None else max(cfg.subset // 5, 100)
        key: tuple[Any, ...] = ("synthetic", n_train, n_test, int(cfg.seed), str(device))
        if key not in shared:
            shared[key] = _ImageSet(synthetic_cifar10(n_train, n_test, cfg.seed),
                                    "SYNTHETIC CIFAR-shaped random data (not CIFAR-10)", device)
    else:
        key = ("files", str(root), bool(cfg.verify), bool(cfg.get("cache_hash", False)), str(device))
        if key not in shared:
            shared[key] = _ImageSet(*read_cifar10(root, cfg.download, cfg.verify, log, bool(cfg.get("cache_hash", False))),
                                    device)
    images: _ImageSet = shared[key]
    labels = images.host["train_labels"]
    n = len(labels)
    if cfg.val_size >= n:
        raise DataError(
            f"data.val_size={cfg.val_size}: the training set has only {n} images; hold out fewer."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(cfg.seed)))
    val_idx = order[: cfg.val_size]
    train_idx = order[cfg.val_size :]
    if cfg.subset is not None:
        train_idx = stratified_subset(train_idx, labels[train_idx], int(cfg.subset))
    train_idx = train_idx.sort().values  # in file order: the batches are shuffled anyway
    eval_idx = eval_subset(labels[train_idx], len(val_idx), int(cfg.seed))
    eval_rows = train_idx if len(eval_idx) == len(train_idx) else train_idx[eval_idx]

    def rows(name: str, index: torch.Tensor | None = None, host: bool = False) -> Split:
        where = images.host if host else images.device
        return Split(where[f"{name}_images"], where[f"{name}_labels"],
                     index=None if index is None else index if host else index.to(device))

    def dataset(host: bool) -> Dataset:
        train = rows("train", train_idx, host)
        return Dataset("classification", train, rows("train", val_idx, host), rows("test", host=host), source=images.source,
                       synthetic=bool(cfg.synthetic), classes=CIFAR10_CLASSES,
                       prepare=_normalizer(device) if host or not normalises_once(device) else (lambda x: x),
                       augment=bool(cfg.get("augment", False)), blank=None if host else images.blank,
                       train_eval=train if eval_rows is train_idx else rows("train", eval_rows, host))

    # The fingerprint is of the images as loaded (uint8), whatever the device keeps.
    data = dataset(host=False)
    data.sha256 = dataset(host=True).fingerprint()
    log(data.describe_class_counts())
    return data


def normalises_once(device: torch.device) -> bool:
    """Whether the device copy of the images is normalised once, when loaded: on an accelerator,
    which takes the normalisation out of every step (float32: 4x the memory of uint8). A CPU run
    keeps uint8 and normalises each batch, since its memory would grow 4x to save little per
    step. Either way a run trains on the same bits."""
    return device.type != "cpu"


class _ImageSet:
    """The decoded images and labels once per batch of members: on the host (uint8, what splits
    are drawn from and fingerprinted) and on the device, normalised there when `normalises_once`."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str, device: torch.device):
        self.host, self.source = tensors, source
        self.device = {name: _to(t, device) for name, t in tensors.items()}
        self.blank = None
        if normalises_once(device):
            prepare = _normalizer(device)
            for name in ("train_images", "test_images"):
                self.device[name] = prepare(self.device[name])
            self.blank = prepare(torch.zeros((1, tensors["train_images"].shape[1], 1, 1), dtype=torch.uint8,
                                             device=device)).view(-1)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)  # without staging
    return tensor.to(device)


def load_dataset(cfg: DictConfig, device: torch.device, log: Callable[[str], None] = print,
                 shared: dict[Any, Any] | None = None) -> Dataset:
    """The dataset `data.*` describes, on `device`; `shared` as load_cifar10 takes it."""
    if cfg.name == "regression":
        data = make_regression(cfg)
        return Dataset(
            data.task, data.train.to(device), data.val.to(device), data.test.to(device), source=data.source
        )
    if cfg.name == "cifar10":
        return load_cifar10(cfg, device, log, shared)
    raise DataError(f"data.name={cfg.name!r}: use regression or cifar10.")
