"""Read and write safetensors files one tensor at a time.

Written by hand because safetensors' Python API writes a file from a complete dict of tensors (the whole shard in
memory) and reads through mmap (touched pages count towards resident memory). The format is simple: an 8-byte
little-endian header length, a JSON header of name -> dtype, shape, byte offsets, then the raw bytes."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos (in file order) and the free-form metadata of one safetensors file."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + length
    infos = {
        name: TensorInfo(path, name, DTYPES[h["dtype"]], tuple(h["shape"]), base + h["data_offsets"][0], base + h["data_offsets"][1])
        for name, h in header.items()
    }
    return dict(sorted(infos.items(), key=lambda kv: kv[1].begin)), meta


def read_tensor(info: TensorInfo) -> torch.Tensor:
    buf = bytearray(info.nbytes)
    with info.file.open("rb") as f:
        f.seek(info.begin)
        f.readinto(buf)
    if not buf:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes) are declared up front, so the header can
    be written first and each tensor streamed to disk as soon as it exists."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        offset = 0
        self._expected = []
        for name, dtype, shape in plan:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, dtype, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % ALIGN)
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != want:
            raise ValueError(f"tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not match the planned {want}")
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise ValueError(f"{self._file.name}: {len(self._expected) - self._next} planned tensors were never written")
        self._file.flush()
        self._file.close()
