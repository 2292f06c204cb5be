"""Read W&B offline run files (`run-<id>.wandb`), so tests can assert what a run really logged.

wandb ships no Python reader for these files (its Go core writes them), so this is a small,
self-contained one. It only reads; it never talks to W&B.

File format, as written by wandb 0.31's core and checked against real files:

* A 7-byte file header: the ident ``b":W&B"``, a little-endian uint16 magic ``0xBEE1`` and a
  uint8 version ``0``.
* Then a LevelDB-log-framed stream of 32 KiB blocks. Block boundaries are counted from file
  offset 0, *including* the file header: the first block holds 32768 - 7 bytes of records.
* Each chunk in a block has a 7-byte header: CRC-32 (uint32 LE), payload length (uint16 LE),
  chunk type (uint8), then the payload. The CRC is the plain IEEE CRC-32 (``zlib.crc32``) of
  the type byte followed by the payload, not LevelDB's masked CRC-32C.
* Chunk types: FULL=1 (a whole record), or FIRST=2, MIDDLE=3..., LAST=4 for a record split
  across blocks. A chunk never straddles a block boundary; when fewer than 7 bytes are left in
  a block they are zero padding. A FIRST chunk may carry zero bytes (when exactly 7 were left).
* Each reassembled payload is one serialized ``wandb.proto.wandb_internal_pb2.Record``.

How the records encode a run (wandb 0.31, what `load_run` relies on):

* ``run`` record: run_id, project, run_group, job_type, display_name, tags, and the initial
  config (items with ``key`` and ``value_json``). Later ``config`` records update/remove items.
* ``history`` records, one per logged step. Their items carry the logged key in
  ``nested_key[0]`` (``key`` is empty), e.g. ``["train/loss"]``; a logged rich value such as a
  histogram or image is flattened into one item per leaf, e.g.
  ``["gradients/net.fc1.weight", "bins"]``. Values are JSON text in ``value_json`` (wandb can
  also write a typed scalar in the ``value`` oneof; both are decoded here).
* ``summary`` records: incremental updates with the same key layout (some use ``key``).
* ``exit`` record: ``exit_code`` (proto3 omits a 0 on the wire, so a clean exit reads 0).
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from wandb.proto.wandb_internal_pb2 import Record

__all__ = [
    "BLOCK_SIZE",
    "OfflineRun",
    "Record",
    "find_run_file",
    "find_run_files",
    "iter_payloads",
    "chunk_crc",
    "load_run",
    "read_records",
]

FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FILE_VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version: 7 bytes

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type: 7 bytes

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_TYPE_NAMES = {FULL: "FULL", FIRST: "FIRST", MIDDLE: "MIDDLE", LAST: "LAST"}

IMAGE_TYPE = "image-file"
HISTOGRAM_TYPE = "histogram"


# --------------------------------------------------------------------------- framing


def chunk_crc(chunk_type: int, payload: bytes) -> int:
    """The checksum W&B stores for a chunk: IEEE CRC-32 of the type byte, then the payload."""
    return zlib.crc32(payload, zlib.crc32(bytes([chunk_type])))


def iter_payloads(data: bytes, *, source: str = "<bytes>") -> Iterator[bytes]:
    """Yield each record payload (reassembled from its chunks) of a whole `.wandb` file.

    Raises ValueError, naming `source` and the byte offset, on a bad file header, a bad CRC, an
    unknown chunk type, a chunk that runs past its block or the file, a FIRST/MIDDLE/LAST out of
    order, non-zero block padding, or a file that ends inside a split record.
    """
    if len(data) < FILE_HEADER.size:
        raise ValueError(f"{source}: too short for a W&B file header ({len(data)} bytes)")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise ValueError(
            f"{source}: not a W&B run file (header ident={ident!r} magic={magic:#06x}, "
            f"expected ident={FILE_IDENT!r} magic={FILE_MAGIC:#06x})"
        )
    if version != FILE_VERSION:
        raise ValueError(f"{source}: unsupported W&B file version {version} (expected {FILE_VERSION})")

    pos = FILE_HEADER.size
    pending: bytearray | None = None  # payload of a split record being reassembled
    pending_start = 0
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            padding = data[pos : pos + left_in_block]
            if any(padding):
                raise ValueError(f"{source}: non-zero block padding at offset {pos}")
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER.size > len(data):
            raise ValueError(f"{source}: truncated chunk header at offset {pos}")
        crc, length, chunk_type = CHUNK_HEADER.unpack_from(data, pos)
        if chunk_type not in _TYPE_NAMES:
            raise ValueError(f"{source}: unknown chunk type {chunk_type} at offset {pos}")
        if CHUNK_HEADER.size + length > left_in_block:
            raise ValueError(
                f"{source}: {_TYPE_NAMES[chunk_type]} chunk at offset {pos} claims {length} bytes, "
                f"past the end of its block ({left_in_block - CHUNK_HEADER.size} left)"
            )
        start = pos + CHUNK_HEADER.size
        payload = data[start : start + length]
        if len(payload) != length:
            raise ValueError(
                f"{source}: chunk at offset {pos} is truncated ({len(payload)} of {length} bytes)"
            )
        if chunk_crc(chunk_type, payload) != crc:
            raise ValueError(f"{source}: CRC mismatch in {_TYPE_NAMES[chunk_type]} chunk at offset {pos}")

        if chunk_type == FULL:
            if pending is not None:
                raise ValueError(f"{source}: FULL chunk at offset {pos} inside a split record")
            yield payload
        elif chunk_type == FIRST:
            if pending is not None:
                raise ValueError(f"{source}: FIRST chunk at offset {pos} inside a split record")
            pending, pending_start = bytearray(payload), pos
        else:  # MIDDLE or LAST
            if pending is None:
                raise ValueError(
                    f"{source}: {_TYPE_NAMES[chunk_type]} chunk at offset {pos} without a FIRST"
                )
            pending += payload
            if chunk_type == LAST:
                yield bytes(pending)
                pending = None
        pos = start + length

    if pending is not None:
        raise ValueError(f"{source}: file ends inside the split record started at offset {pending_start}")


def read_records(path: str | Path) -> list[Record]:
    """All records of a `.wandb` file, in file order, as `wandb_internal_pb2.Record` messages.

    Raises ValueError on a bad header, corrupt framing (see `iter_payloads`) or a payload that
    is not a `Record`.
    """
    path = Path(path)
    payloads = list(iter_payloads(path.read_bytes(), source=str(path)))  # framing errors first
    records: list[Record] = []
    for index, payload in enumerate(payloads):
        record = Record()
        try:
            record.ParseFromString(payload)
        except Exception as exc:  # protobuf's DecodeError
            raise ValueError(f"{path}: record #{index} is not a valid Record: {exc}") from exc
        records.append(record)
    return records


# --------------------------------------------------------------------------- locating files


def find_run_files(run_dir: str | Path) -> list[Path]:
    """Every `<run_dir>/wandb/offline-run-*/run-*.wandb`, sorted (possibly empty)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def find_run_file(run_dir: str | Path) -> Path:
    """The single offline run file under `<run_dir>/wandb/offline-run-*/`.

    Raises FileNotFoundError when there is none and ValueError when there is more than one.
    """
    files = find_run_files(run_dir)
    if not files:
        raise FileNotFoundError(f"no wandb/offline-run-*/run-*.wandb under {run_dir}")
    if len(files) > 1:
        listing = ", ".join(str(f) for f in files)
        raise ValueError(f"{len(files)} offline W&B runs under {run_dir}, expected one: {listing}")
    return files[0]


# --------------------------------------------------------------------------- decoding a run


def _item_path(item: Any) -> list[str]:
    """An item's key path: `nested_key` when present, else `[key]`."""
    path = list(item.nested_key) or [item.key]
    if not path[0]:
        raise ValueError(f"item with no key: {item}")
    return path


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    """target[path[0]][path[1]]... = value, creating (or replacing non-dict) levels."""
    for name in path[:-1]:
        child = target.get(name)
        if not isinstance(child, dict):
            child = target[name] = {}
        target = child
    target[path[-1]] = value


def _del_path(target: dict[str, Any], path: list[str]) -> None:
    """Remove target[path[0]][path[1]]... when present."""
    for name in path[:-1]:
        target = target.get(name)
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def _history_value(item: Any) -> Any:
    """A history item's value: `value_json` when set, else the typed `value` oneof."""
    if item.value_json:
        return json.loads(item.value_json)
    case = item.WhichOneof("value")
    if case is None:
        raise ValueError(f"history item {_item_path(item)} has no value")
    if case == "none":
        return None
    if case == "json":
        return json.loads(item.json)
    return getattr(item, case)  # boolean, integer, number, text


@dataclass
class OfflineRun:
    """What one offline W&B run logged, decoded from its `.wandb` file.

    `history` is one dict per history record (one per logged step), logged key -> value, with
    W&B's own `_step`, `_runtime` and `_timestamp` included. Keys are the logged names
    (`"train/loss"`); rich values come back as the dicts W&B stores, e.g. a histogram
    `{"_type": "histogram", "values": [...], "bins": [...]}` or an image
    `{"_type": "image-file", "path": ..., "sha256": ..., "width": ..., ...}`.

    `config` is key -> value (nested config keys joined by "."; dict values stay dicts).
    `summary` is the final summary after every update in order; a metric defined with
    `summary="min"` appears as `{"min": ...}`. W&B's internal `_wandb` entry is dropped from
    both. `exit_code` is None when the file has no exit record (the run did not finish).
    """

    path: Path
    run_id: str
    project: str
    entity: str
    name: str
    group: str
    job_type: str
    tags: list[str]
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    exit_code: int | None
    records: list[Record] = field(default_factory=list, repr=False)

    def history_keys(self) -> set[str]:
        """Every key that appears in at least one history row."""
        return {key for row in self.history for key in row}

    def scalars(self, key: str) -> list[Any]:
        """The values of `key` in history order, from the rows that contain it."""
        return [row[key] for row in self.history if key in row]

    def _keys_of_type(self, media_type: str) -> set[str]:
        return {
            key
            for row in self.history
            for key, value in row.items()
            if isinstance(value, dict) and value.get("_type") == media_type
        }

    def images(self) -> set[str]:
        """History keys logged at least once as an image (`_type == "image-file"`)."""
        return self._keys_of_type(IMAGE_TYPE)

    def histograms(self) -> set[str]:
        """History keys logged at least once as a histogram (`_type == "histogram"`)."""
        return self._keys_of_type(HISTOGRAM_TYPE)


def _apply_config(config: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any]) -> None:
    for item in updates:
        config[".".join(_item_path(item))] = json.loads(item.value_json)
    for item in removes:
        config.pop(".".join(_item_path(item)), None)


def _apply_summary(summary: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any]) -> None:
    for item in updates:
        _set_path(summary, _item_path(item), json.loads(item.value_json))
    for item in removes:
        _del_path(summary, _item_path(item))


def load_run(path_or_run_dir: str | Path) -> OfflineRun:
    """Decode one offline run.

    Accepts a `run-*.wandb` file, an `offline-run-*` directory holding one, or a run directory
    (`<run_dir>/wandb/offline-run-*/run-*.wandb`, see `find_run_file`).
    """
    # A run finished in this process may still have its file's last block in W&B's service;
    # shutting the service down writes it out, as the end of a `dropstudy` process does (the
    # next run starts a new service).
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    target = Path(path_or_run_dir)
    if target.is_dir():
        direct = sorted(target.glob("run-*.wandb"))  # an offline-run-* directory itself
        if len(direct) == 1 and not (target / "wandb").is_dir():
            target = direct[0]
        else:
            target = find_run_file(target)
    records = read_records(target)

    run_record = None
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    exit_code: int | None = None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_record = record.run
            _apply_config(config, run_record.config.update, run_record.config.remove)
            _apply_summary(summary, run_record.summary.update, run_record.summary.remove)
        elif kind == "config":
            _apply_config(config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply_summary(summary, record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _history_value(item))
            history.append(row)
        elif kind == "exit":
            exit_code = record.exit.exit_code

    if run_record is None:
        raise ValueError(f"{target}: no run record")
    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    return OfflineRun(
        path=target,
        run_id=run_record.run_id,
        project=run_record.project,
        entity=run_record.entity,
        name=run_record.display_name,
        group=run_record.run_group,
        job_type=run_record.job_type,
        tags=list(run_record.tags),
        config=config,
        history=history,
        summary=summary,
        exit_code=exit_code,
        records=records,
    )
