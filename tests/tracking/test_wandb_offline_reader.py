"""Fast checks of the `.wandb` reader in `wandb_offline.py` on synthetic files (no training).

The files here are written by `frame`, a deliberately separate, minimal LevelDB-log writer
following the same rules as W&B's core: a 7-byte `:W&B` header, 32 KiB blocks counted from
file offset 0, chunks that never cross a block, zero padding when fewer than 7 bytes are left,
and a zero-length FIRST chunk when exactly 7 are left.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb
from wandb_offline import find_run_file, find_run_files, iter_payloads, load_run, read_records

BLOCK = 32768
FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def frame(payloads: list[bytes]) -> tuple[bytes, list[tuple[int, int, int]]]:
    """A framed file holding `payloads`, and its chunks as (offset, type, length)."""
    out = bytearray(FILE_HEADER)
    chunks: list[tuple[int, int, int]] = []
    for payload in payloads:
        rest, first = payload, True
        while True:
            left = BLOCK - len(out) % BLOCK
            if left < 7:
                out += bytes(left)
                left = BLOCK
            piece, rest = rest[: left - 7], rest[left - 7 :]
            last = not rest
            kind = FULL if first and last else FIRST if first else LAST if last else MIDDLE
            crc = zlib.crc32(piece, zlib.crc32(bytes([kind])))
            chunks.append((len(out), kind, len(piece)))
            out += struct.pack("<IHB", crc, len(piece), kind) + piece
            first = False
            if last:
                break
    return bytes(out), chunks


def test_payloads_round_trip_across_block_boundaries():
    payloads = [
        b"a" * 32751,  # ends 3 bytes short of the first block: zero padding follows
        b"b" * 32754,  # ends exactly 7 bytes short of the second block
        b"c" * 100,  # so this one starts with a zero-length FIRST there, then a LAST
        bytes(range(256)) * 300,  # 76,800 bytes: FIRST, MIDDLE, LAST
        b"",  # an empty record is a zero-length FULL
        b"tail",
    ]
    data, chunks = frame(payloads)
    kinds = [kind for _, kind, _ in chunks]
    assert kinds == [FULL, FULL, FIRST, LAST, FIRST, MIDDLE, LAST, FULL, FULL]
    assert data[BLOCK - 3 : BLOCK] == bytes(3) and chunks[1][0] == BLOCK
    assert chunks[2] == (2 * BLOCK - 7, FIRST, 0)

    assert list(iter_payloads(data)) == payloads


def test_records_round_trip(tmp_path: Path):
    records = [pb.Record(num=i, uuid=f"r{i}" + "x" * (i * 9000)) for i in range(8)]
    path = tmp_path / "run-test.wandb"
    data, chunks = frame([r.SerializeToString() for r in records])
    path.write_bytes(data)
    assert {kind for _, kind, _ in chunks} == {FULL, FIRST, MIDDLE, LAST}

    assert read_records(path) == records


def _flip(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


FIRST_CHUNK = 7  # the first chunk header starts right after the 7-byte file header
FIRST_PAYLOAD = FIRST_CHUNK + 7


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: _flip(d, FIRST_PAYLOAD, bytes([d[FIRST_PAYLOAD] ^ 0xFF])), "CRC mismatch"),
        (lambda d: _flip(d, FIRST_CHUNK, b"\0\0\0\0"), "CRC mismatch"),
        (lambda d: _flip(d, FIRST_CHUNK + 6, b"\x09"), "unknown chunk type 9"),
        (lambda d: _flip(d, FIRST_CHUNK + 4, struct.pack("<H", 40000)), "past the end of its block"),
        (lambda d: _flip(d, 0, b":W&X"), "not a W&B run file"),
        (lambda d: _flip(d, 4, struct.pack("<H", 0x1234)), "not a W&B run file"),
        (lambda d: _flip(d, 6, b"\x07"), "unsupported W&B file version"),
        (lambda d: d[:3], "too short"),
        (lambda d: d[:BLOCK], "file ends inside the split record"),
        (lambda d: d[:-2], "truncated"),
    ],
    ids=["payload-byte", "crc-field", "chunk-type", "length", "ident", "magic", "version", "short",
         "split-record-cut", "last-chunk-cut"],
)
def test_corrupt_files_raise_value_error(tmp_path: Path, corrupt, message):
    records = [pb.Record(num=1), pb.Record(num=2, uuid="z" * 70000), pb.Record(num=3)]
    data, _ = frame([r.SerializeToString() for r in records])
    path = tmp_path / "run-bad.wandb"
    path.write_bytes(data)
    assert read_records(path) == records  # intact, it reads
    path.write_bytes(corrupt(data))
    with pytest.raises(ValueError, match=message):
        read_records(path)


def test_nonzero_block_padding_is_rejected():
    data, _ = frame([b"a" * 32751, b"b"])  # 3 bytes of padding end the first block
    assert list(iter_payloads(data)) == [b"a" * 32751, b"b"]
    with pytest.raises(ValueError, match="non-zero block padding at offset 32765"):
        list(iter_payloads(_flip(data, BLOCK - 2, b"\x01")))


def test_load_run_decodes_what_wandb_writes(tmp_path: Path):
    """Records shaped like wandb 0.31's: logged keys in nested_key[0], rich values flattened."""
    run = pb.Record()
    run.run.run_id, run.run.project = "abc123", "dropstudy"
    run.run.run_group, run.run.job_type = "regression-study", "dropout-0.5"
    run.run.tags.extend(["regression", "dropout-0.5"])
    for key, value in {"_wandb": {}, "seed": 0, "model.dropout": 0.5, "model.hidden": [8, 8]}.items():
        run.run.config.update.add(key=key, value_json=json.dumps(value))

    config = pb.Record()
    config.config.update.add(nested_key=["optim", "lr"], value_json="0.01")

    def history(items: dict[tuple[str, ...], object]) -> pb.Record:
        record = pb.Record()
        for path, value in items.items():
            record.history.item.add(nested_key=list(path), value_json=json.dumps(value))
        return record

    row0 = history({("epoch",): 1, ("train/loss",): 1.5, ("_step",): 0})
    row1 = history(
        {
            ("epoch",): 2,
            ("train/loss",): 1.0,
            ("gradients/net.fc1.weight", "_type"): "histogram",
            ("gradients/net.fc1.weight", "values"): [1, 2],
            ("gradients/net.fc1.weight", "bins"): [0.0, 0.5, 1.0],
            ("_step",): 1,
        }
    )
    row2 = history({("plots/fit", "_type"): "image-file", ("plots/fit", "path"): "a.png", ("_step",): 2})
    typed = pb.Record()  # wandb may also write scalars in the typed `value` oneof
    typed.history.item.add(nested_key=["val/loss"], number=0.25)
    typed.history.item.add(nested_key=["note"], text="hi")
    typed.history.item.add(nested_key=["flag"], boolean=True)

    summary1 = pb.Record()
    summary1.summary.update.add(nested_key=["val/loss", "min"], value_json="0.5")
    summary1.summary.update.add(key="train/loss", value_json="1.0")
    summary2 = pb.Record()
    summary2.summary.update.add(nested_key=["val/loss", "min"], value_json="0.25")
    summary2.summary.update.add(nested_key=["_wandb", "runtime"], value_json="1")
    exit_record = pb.Record()
    exit_record.exit.runtime = 1  # exit_code 0 is proto3's default: absent on the wire

    run_dir = tmp_path / "run"
    offline = run_dir / "wandb" / "offline-run-20260101_000000-abc123"
    offline.mkdir(parents=True)
    records = [run, config, row0, row1, row2, typed, summary1, summary2, exit_record]
    data, _ = frame([r.SerializeToString() for r in records])
    (offline / "run-abc123.wandb").write_bytes(data)

    assert find_run_file(run_dir) == offline / "run-abc123.wandb"
    loaded = load_run(run_dir)
    assert load_run(offline).history == load_run(offline / "run-abc123.wandb").history == loaded.history
    assert (loaded.run_id, loaded.project, loaded.group, loaded.job_type) == (
        "abc123",
        "dropstudy",
        "regression-study",
        "dropout-0.5",
    )
    assert loaded.tags == ["regression", "dropout-0.5"]
    assert loaded.config == {"seed": 0, "model.dropout": 0.5, "model.hidden": [8, 8], "optim.lr": 0.01}
    assert loaded.history[1]["gradients/net.fc1.weight"] == {
        "_type": "histogram",
        "values": [1, 2],
        "bins": [0.0, 0.5, 1.0],
    }
    assert loaded.history[3] == {"val/loss": 0.25, "note": "hi", "flag": True}
    assert loaded.scalars("train/loss") == [1.5, 1.0]
    assert loaded.history_keys() == {
        "epoch", "train/loss", "_step", "gradients/net.fc1.weight", "plots/fit", "val/loss", "note", "flag"
    }
    assert loaded.histograms() == {"gradients/net.fc1.weight"}
    assert loaded.images() == {"plots/fit"}
    assert loaded.summary == {"val/loss": {"min": 0.25}, "train/loss": 1.0}
    assert loaded.exit_code == 0


def test_find_run_file_wants_exactly_one(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        find_run_file(tmp_path)
    for run_id in ("aaa", "bbb"):
        folder = tmp_path / "wandb" / f"offline-run-20260101_000000-{run_id}"
        folder.mkdir(parents=True)
        (folder / f"run-{run_id}.wandb").write_bytes(FILE_HEADER)
    assert [p.name for p in find_run_files(tmp_path)] == ["run-aaa.wandb", "run-bbb.wandb"]
    with pytest.raises(ValueError, match="2 offline W&B runs"):
        find_run_file(tmp_path)
