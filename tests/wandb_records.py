"""Read an offline W&B run back from its `.wandb` file, with wandb's own protobuf classes and no network.

The file is a 7-byte header (":W&B", a 2-byte magic, a version byte) then a LevelDB-style log: 32 KiB blocks of
chunks, each a 4-byte CRC, 2-byte length and 1-byte type (1 full, 2 first, 3 middle, 4 last) before its bytes; a
block's tail too short for a chunk header is zero padding. Records are `wandb_internal_pb2.Record` messages."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER, CHUNK = 32768, 7, 7


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + CHUNK <= len(data):
        if BLOCK - pos % BLOCK < CHUNK:  # the block's zero-padded tail
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK])
        if kind == 0 and length == 0:  # preallocated, never written
            break
        payload, pos = data[pos + CHUNK : pos + CHUNK + length], pos + CHUNK + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(path: Path) -> list[dict]:
    """The logged rows, each {"_step": step, metric: value}."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def config(path: Path) -> dict:
    """The run's config as recorded (the last value of each key)."""
    values = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            for item in (r.run.config if kind == "run" else r.config).update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values
