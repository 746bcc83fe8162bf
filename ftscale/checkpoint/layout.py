"""Where checkpoints live, how a complete one is recognised, and the manifest that proves it complete.

    <dir>/step-00000012/            a complete checkpoint (it has manifest.json, written last)
    <dir>/.step-00000013.partial/   being written; never loaded, removed by the next save
    <dir>/latest                    name of the newest complete checkpoint (updated after the rename)
    <dir>/PREEMPTED                 written when a signal stopped the run; tells launchers to requeue"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ftscale.errors import FtscaleError

log = logging.getLogger("ftscale")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
PREEMPTED = "PREEMPTED"
STEP_DIR = re.compile(r"step-(\d{8})")


class CheckpointError(FtscaleError, RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def partial_dir(root: Path, step: int) -> Path:
    return root / f".{step_dir_name(step)}.partial"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path, step: int, extra: dict) -> dict:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "files": {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files},
        **extra,
    }
    write_atomically(ckpt / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict


def verify(path: Path, checksums: bool) -> Checkpoint:
    """The checkpoint at `path` if its manifest is present and every file matches it; else CheckpointError."""
    m = STEP_DIR.fullmatch(path.name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint folder (expected a name like step-00000012)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: incomplete checkpoint (no readable {MANIFEST}: {e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format_version')}, this ftscale reads {FORMAT_VERSION}")
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{path}: {rel} is missing or has the wrong size")
        if checksums and sha256(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {rel} does not match its checksum")
    return Checkpoint(path, int(m.group(1)), manifest)


def complete_checkpoints(root: Path, checksums: bool) -> list[Checkpoint]:
    """Every verified checkpoint under `root`, oldest first; broken ones are logged and skipped."""
    found = []
    for p in sorted(root.glob("step-*")) if root.is_dir() else []:
        try:
            found.append(verify(p, checksums))
        except CheckpointError as e:
            log.warning("skipping %s", e)
    return found
