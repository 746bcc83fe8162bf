"""The token store: one source's tokenized examples on disk, memory-mapped by every rank that trains on it.

A folder of flat arrays (numpy, no framework needed to read them):
  tokens.bin       uint32, every example's token ids one after another
  loss_mask.bin    uint8, 1 where the token carries loss
  lengths.bin      int32, tokens per example (offsets are their running sum)
  loss_tokens.bin  int32, loss tokens per example (the first label never counts)
  manifest.json    written last: counts, statistics, and each file's size and SHA-256
  verified.json    when its checksums were last checked: each file's size, modification time and inode then

A rank holds per-example lengths, loss tokens and offsets (24 bytes an example) and reads token slices when a
micro-batch needs them, so its memory grows with the examples, not the tokens. The folder is built aside and
renamed into place whole. Before use, every byte is checked against the manifest's checksums unless no file has
changed (size, modification time, inode) since the last such check; so a partial, truncated or rewritten store
is never read, and a large store that nobody touched opens in a moment."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import suppress
from pathlib import Path

import numpy as np

from ftscale.data.examples import TokenizedChunk
from ftscale.data.tokenize import Encoded

log = logging.getLogger("ftscale")

FORMAT = "ftscale-token-store"
VERSION = 1
MANIFEST = "manifest.json"
VERIFIED = "verified.json"
STATS = ("examples", "skipped", "truncated", "dropped", "no_loss", "tokens", "loss_tokens")
ARRAYS = {"tokens.bin": np.uint32, "loss_mask.bin": np.uint8, "lengths.bin": np.int32, "loss_tokens.bin": np.int32}
HISTOGRAM_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 1 << 31]


def length_histogram(lengths: np.ndarray) -> dict[str, int]:
    """Examples per length bucket ("128-255": n), empty buckets left out."""
    counts, _ = np.histogram(lengths, bins=HISTOGRAM_EDGES)
    return {f"{lo}-{hi - 1}": int(n) for lo, hi, n in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:], counts, strict=False) if n}


class StoreWriter:
    """Appends tokenized chunks to a new store folder, hashing the bytes as they are written."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True)
        self.folder = folder
        self._files = {name: (folder / name).open("wb") for name in ARRAYS}
        self._hashes = {name: hashlib.sha256() for name in ARRAYS}

    def _write(self, name: str, array: np.ndarray) -> None:
        data = array.astype(ARRAYS[name], copy=False).tobytes()
        self._files[name].write(data)
        self._hashes[name].update(data)

    def append(self, chunk: TokenizedChunk) -> None:
        self._write("tokens.bin", chunk.ids)
        self._write("loss_mask.bin", chunk.loss_mask)
        self._write("lengths.bin", chunk.lengths)
        self._write("loss_tokens.bin", chunk.loss_tokens)

    def finish(self, description: dict) -> None:
        """Close the arrays and write the manifest (last: a folder without one is incomplete)."""
        files = {}
        for name, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            files[name] = {"bytes": (self.folder / name).stat().st_size, "sha256": self._hashes[name].hexdigest()}
        lengths = np.fromfile(self.folder / "lengths.bin", dtype=np.int32)
        manifest = {"format": FORMAT, "version": VERSION, **description, "length_histogram": length_histogram(lengths), "files": files}
        with (self.folder / MANIFEST).open("w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())

    def abort(self) -> None:
        for f in self._files.values():
            with suppress(OSError):  # closing flushes, which fails again on a full disk; the first error is raised
                f.close()


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_states(folder: Path) -> dict[str, list[int]]:
    # ctime too: no tool can set it back, as `touch -r` or `cp -p` set mtime back.
    return {name: [(st := (folder / name).stat()).st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name in (*ARRAYS, MANIFEST)}


def record_verified(folder: Path, states: dict | None = None) -> None:
    """Note that every byte of `folder` matched its checksums when its files were in `states` (default: now); a
    read-only cache is checked again next time."""
    with suppress(OSError):
        (folder / VERIFIED).write_text(json.dumps(states or _file_states(folder)))


def store_problem(folder: Path, key: str) -> str | None:
    """Why `folder` is not a complete, intact store for `key` (None when it is). Reads every byte once, unless
    verified.json shows no file changed since the last full check. A file that cannot be read raises OSError (an
    I/O error is no reason to delete a store others may be reading)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest: its build did not finish"
    except ValueError as e:
        return f"unreadable manifest ({e})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return "not a token store of this version"
    if manifest.get("key") != key:
        return f"written for key {manifest.get('key')}, not {key}"
    files, stats = manifest.get("files"), manifest.get("stats")
    if not isinstance(files, dict) or set(files) != set(ARRAYS) or not all(isinstance(f, dict) for f in files.values()):
        return "the manifest does not list the store's files"
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), int) for k in STATS):
        return "the manifest has no statistics"
    for name in ARRAYS:
        if not (folder / name).is_file():
            return f"{name} is missing"
    states = _file_states(folder)  # before hashing: a change during the hashing is not taken as verified
    try:
        if json.loads((folder / VERIFIED).read_text()) == states:
            return None
    except (OSError, ValueError):
        pass  # never verified here, or the record is damaged: check every byte
    for name, want in files.items():
        path = folder / name
        if path.stat().st_size != want.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want.get('bytes')}"
        if _sha256(path) != want.get("sha256"):
            return f"{name} does not match its checksum"
    if _file_states(folder) == states:
        record_verified(folder, states)
    return None


class TokenStore:
    """A verified store, opened read-only. `encoded(i)` reads example i's tokens from the memory map."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest = json.loads((folder / MANIFEST).read_text())
        self.lengths = np.fromfile(folder / "lengths.bin", dtype=np.int32).astype(np.int64)
        self.loss_tokens = np.fromfile(folder / "loss_tokens.bin", dtype=np.int32).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        # np.memmap refuses empty files; a source whose every row was skipped has no tokens.
        self._tokens = np.memmap(folder / "tokens.bin", dtype=np.uint32, mode="r") if self.offsets[-1] else np.zeros(0, np.uint32)
        self._mask = np.memmap(folder / "loss_mask.bin", dtype=np.uint8, mode="r") if self.offsets[-1] else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def stats(self) -> dict:
        return self.manifest["stats"]

    def encoded(self, i: int) -> Encoded:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Encoded(self._tokens[a:b].astype(np.int64), self._mask[a:b].astype(bool))
