"""Read and write safetensors files one tensor at a time.

Written by hand because safetensors' Python API writes a file from a complete dict of tensors (the whole shard in
memory) and reads through mmap (touched pages count towards resident memory). The format is simple: an 8-byte
little-endian header length, a JSON header of name -> dtype, shape, byte offsets, then the raw bytes."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ftscale.errors import FtscaleError

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e8m0fnu: "F8_E8M0",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
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


class SafetensorsError(FtscaleError, ValueError):
    """A safetensors file that is truncated, corrupt or not safetensors at all; the message names file and tensor."""


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of `shape` and `dtype`. Python integers: torch.Size.numel() wraps around for absurd shapes,
    which would let a corrupt header pass as 0 bytes."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _ints(value, count: int | None = None) -> bool:
    """A JSON list of non-negative integers (booleans are not integers here), each small enough to be a size."""
    return isinstance(value, list) and (count is None or len(value) == count) and all(type(v) is int and 0 <= v < 2**63 for v in value)


def _entry(path: Path, name: str, h, data_start: int) -> TensorInfo:
    if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
        raise SafetensorsError(f"{path}: corrupt safetensors header: entry '{name}' lacks dtype, shape or data_offsets")
    if not isinstance(h["dtype"], str) or h["dtype"] not in DTYPES:
        raise SafetensorsError(f"{path}: tensor '{name}' has dtype {h['dtype']!r}, which ftscale does not read ({', '.join(DTYPES)})")
    shape, offsets = h["shape"], h["data_offsets"]
    if not _ints(shape):
        raise SafetensorsError(f"{path}: corrupt safetensors header: tensor '{name}' has shape {shape!r}")
    if not (_ints(offsets, 2) and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{path}: corrupt safetensors header: tensor '{name}' has data_offsets {offsets!r}")
    dtype = DTYPES[h["dtype"]]
    want = tensor_bytes(shape, dtype)
    if offsets[1] - offsets[0] != want:
        raise SafetensorsError(
            f"{path}: corrupt safetensors header: tensor '{name}' {tuple(shape)} {h['dtype']} needs {want} bytes, "
            f"its offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(path, name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos (in file order) and the free-form metadata of one safetensors file.

    The header is checked against the file before anything is planned from it: every tensor's bytes must lie inside
    the file, back to back, with no gap and nothing after the last one. A truncated download or a half-copied file
    is refused here, naming the first tensor that does not fit, instead of being read as zeros later."""
    size = path.stat().st_size
    with path.open("rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise SafetensorsError(f"{path}: {size} bytes: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", first)
        if length > size - 8:
            raise SafetensorsError(f"{path}: truncated or not safetensors: the header claims {length} bytes, the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, absurd numbers, absurd nesting
            raise SafetensorsError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise SafetensorsError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    data_start = 8 + length
    infos = sorted((_entry(path, name, h, data_start) for name, h in header.items()), key=lambda i: (i.begin, i.end))
    position = data_start
    for info in infos:
        if info.begin != position:
            raise SafetensorsError(
                f"{path}: corrupt safetensors header: tensor '{info.name}' starts at byte {info.begin}, expected {position}"
            )
        if info.end > size:
            raise SafetensorsError(
                f"{path}: truncated: tensor '{info.name}' ends at byte {info.end} but the file has only {size} bytes "
                "(an interrupted download or copy? fetch the file again)"
            )
        position = info.end
    if position != size:
        raise SafetensorsError(f"{path}: corrupt: {size - position} bytes after the last tensor")
    return {i.name: i for i in infos}, meta


def read_tensor(info: TensorInfo) -> torch.Tensor:
    buf = bytearray(info.nbytes)
    with info.file.open("rb") as f:
        f.seek(info.begin)
        got = f.readinto(buf)
    if got != info.nbytes:  # the file shrank after its header was checked
        raise SafetensorsError(f"{info.file}: truncated: tensor '{info.name}' needs {info.nbytes} bytes, only {got} could be read")
    if not buf:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of one (small) file, after the header check: for adapters and checkpoint shards."""
    infos, meta = read_header(path)
    return {name: read_tensor(info) for name, info in infos.items()}, meta


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes) are declared up front, so the header can
    be written first and each tensor streamed to disk as soon as it exists."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        offset = 0
        self._expected = []
        for name, dtype, shape in plan:
            nbytes = tensor_bytes(shape, dtype)
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
