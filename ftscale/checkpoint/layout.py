"""Where checkpoints live, how a complete one is recognised, and the manifest that proves it complete.

    <dir>/step-00000012/            a complete checkpoint (it has manifest.json, written last)
    <dir>/.step-00000013.partial/   being written; never loaded, removed by the next save
    <dir>/latest                    name of the newest complete checkpoint (updated after the rename)
    <dir>/PREEMPTED                 written when a signal stopped the run; tells launchers to requeue
    <dir>/superseded/               other runs' checkpoints, set aside (CheckpointStore.start)

Inside a checkpoint (every name below is a constant of this module):
    manifest.json                   written last: format version, world size, run id, every file's size and sha256
    adapter/shard-RRRRR-of-WWWWW.safetensors    trainable parameters by name, each rank a share of them
    optimizer/shard-RRRRR-of-WWWWW.safetensors  their AdamW state ("<name>::exp_avg", ...), same shares
    optimizer/param_groups.json, scheduler.json, trainer_state.json, config.yaml
    rng/rank-RRRRR.safetensors      each rank's RNG states
    adapter_config/, base_config.json   what export-adapter needs to rebuild the adapter without the base"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ftscale.atomic_files import write_text_atomically
from ftscale.errors import FtscaleError
from ftscale.json_files import read_json
from ftscale.safetensors_stream import load_safetensors

log = logging.getLogger("ftscale")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
PREEMPTED = "PREEMPTED"
STEP_DIR = re.compile(r"step-(\d{8})")
# Sub-folders of a checkpoint: each holds one safetensors shard per rank (RNG: one file per rank).
ADAPTER, OPTIMIZER, RNG = "adapter", "optimizer", "rng"
TRAINER_STATE = "trainer_state.json"  # ftscale.checkpoint.trainer_state.TrainerState
CONFIG = "config.yaml"  # the run's whole config; its identity keys must match to resume
SCHEDULER = "scheduler.json"  # the learning-rate scheduler's state_dict
PARAM_GROUPS = f"{OPTIMIZER}/param_groups.json"  # optimizer hyper-parameters per group, parameters by name
ADAPTER_CONFIG = "adapter_config"  # folder: the adapter's config without weights (export-adapter copies it)
BASE_CONFIG = "base_config.json"  # the base's config.json, when it had one: export-adapter rebuilds the skeleton
REQUIRED_FILES = (TRAINER_STATE, CONFIG, SCHEDULER, PARAM_GROUPS)
SUPERSEDED = "superseded"  # checkpoints of other runs found in the folder are moved here, never deleted or mixed
# Beside the checkpoint folder, in the output folder: the W&B id, which checkpoints from before run ids resume with.
WANDB_RUN_ID = "wandb-run-id"


class CheckpointError(FtscaleError, RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def rng_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


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
        "files": {p.relative_to(ckpt).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files},
        **extra,
    }
    write_text_atomically(ckpt / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict

    @property
    def run_id(self) -> str | None:
        """The run that wrote it (checkpoints written before runs had an identity have none)."""
        return self.manifest.get("run_id")

    def listed(self, folder: str) -> list[Path]:
        """The files the manifest lists directly in `folder`, sorted: only these are ever read."""
        return [self.path / rel for rel in sorted(self.manifest["files"]) if PurePosixPath(rel).parent == PurePosixPath(folder)]

    def read_json(self, rel: str):
        """A JSON file of the checkpoint; a corrupt one is a CheckpointError naming it."""
        return read_json(self.path / rel, CheckpointError)

    def read_tensors(self, folder: str) -> dict[str, torch.Tensor]:
        """Every tensor of every listed safetensors shard in `folder` (the adapter or optimizer of all ranks)."""
        tensors: dict[str, torch.Tensor] = {}
        for f in self.listed(folder):
            if f.suffix == ".safetensors":
                tensors.update(load_safetensors(f)[0])
        return tensors


def _check_manifest(path: Path, manifest) -> None:
    """A manifest that parses as JSON but is not one (no file list, paths leaving the folder) is corrupt."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(i, dict) and {"bytes", "sha256"} <= set(i) for i in files.values()):
        raise CheckpointError(f"{path}: corrupt {MANIFEST}: it has no valid 'files' list")
    for rel in files:
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise CheckpointError(f"{path}: corrupt {MANIFEST}: file {rel!r} points outside the checkpoint folder")
    world, run_id = manifest.get("world_size"), manifest.get("run_id")
    if type(world) is not int or not 1 <= world <= len(files) or not (run_id is None or isinstance(run_id, str)):
        raise CheckpointError(f"{path}: corrupt {MANIFEST}: world_size must be a positive integer and run_id a string")
    shards = [f"{sub}/{shard_name(r, world)}" for sub in (ADAPTER, OPTIMIZER) for r in range(world)]
    missing = [f for f in (*REQUIRED_FILES, *shards, *(f"{RNG}/{rng_name(r)}" for r in range(world))) if f not in files]
    if missing:
        raise CheckpointError(f"{path}: corrupt {MANIFEST}: it does not list {', '.join(missing[:3])}")


def verify(path: Path, checksums: bool) -> Checkpoint:
    """The checkpoint at `path` if its manifest is present and every file matches it; else CheckpointError."""
    m = STEP_DIR.fullmatch(path.name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint folder (expected a name like step-00000012)")
    try:
        manifest = read_json(path / MANIFEST, CheckpointError)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: incomplete checkpoint (no readable {MANIFEST}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {version}, this ftscale reads {FORMAT_VERSION}")
    _check_manifest(path, manifest)
    inside = path.resolve()
    for rel, info in manifest["files"].items():
        f = path / rel
        try:
            escapes = not f.resolve().is_relative_to(inside)  # a symbolic link out of the folder
        except (OSError, RuntimeError):  # a link loop
            escapes = True
        if escapes:
            raise CheckpointError(f"{path}: {rel} links outside the checkpoint folder")
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
