"""Save and resume training checkpoints: every rank writes its shard into a partial folder, rank 0 checks that
every rank's files arrived, writes the manifest, renames the folder into place and updates `latest`."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ftscale.checkpoint.layout import (
    LATEST,
    PREEMPTED,
    STEP_DIR,
    Checkpoint,
    CheckpointError,
    complete_checkpoints,
    partial_dir,
    step_dir_name,
    verify,
    write_atomically,
    write_manifest,
)
from ftscale.checkpoint.state import (
    owned_names,
    restore_rng,
    rng_state,
    trainable_parameters,
)
from ftscale.config import FtscaleConfig, load_config, render_config

log = logging.getLogger("ftscale")

# Settings a resumed run must share with its checkpoint: the model and adapter shape, and everything that decides
# which rows each step sees. Others (learning rate, logging, max_steps) may change between runs.
IDENTITY_KEYS = ("model.path", "method.", "data.train", "data.max_seq_len", "data.packing", "data.train_on", "data.overlong", "training.seed")


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: FtscaleConfig, current: FtscaleConfig) -> list[str]:
    a, b = _flatten(saved.model_dump(mode="json")), _flatten(current.model_dump(mode="json"))
    keys = sorted(k for k in set(a) | set(b) if k.startswith(IDENTITY_KEYS) and a.get(k) != b.get(k))
    return [f"{k}: checkpoint has {a.get(k)!r}, this run has {b.get(k)!r}" for k in keys]


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def read_shards(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return tensors


def _remove(path: Path) -> None:
    """Rename first, then delete: a crash mid-delete leaves a dotted folder that is never taken for a checkpoint."""
    doomed = path.with_name(f".deleting-{path.name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


class CheckpointStore:
    def __init__(self, cfg: FtscaleConfig, accelerator):
        self.cfg, self.acc = cfg, accelerator
        self.root = Path(cfg.checkpoint.dir or Path(cfg.training.output_dir) / "checkpoints")
        self.protected: Path | None = None  # the checkpoint this run resumed from: retention never deletes it

    # ---- save ---------------------------------------------------------------------------------------------------
    def save(self, step: int, model, access, scheduler, trainer_state: dict, write_adapter_config) -> Path:
        """Collective: every rank must call it. `model` is the unwrapped model; `access` reads its full state
        (state.state_access)."""
        acc, rank, world = self.acc, self.acc.process_index, self.acc.num_processes
        tmp, final = partial_dir(self.root, step), self.root / step_dir_name(step)
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a partial folder from a crash: never loaded, safe to drop
            tmp.mkdir()
        acc.wait_for_everyone()
        params = trainable_parameters(model)
        param_tensors, optim_tensors = access.collect(params, owned_names(list(params), rank, world))
        groups = access.groups(params)
        for sub in ("adapter", "optimizer", "rng"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        save_file(param_tensors, str(tmp / "adapter" / _shard_name(rank, world)))
        save_file(optim_tensors, str(tmp / "optimizer" / _shard_name(rank, world)))
        rng, rng_meta = rng_state()
        save_file(rng, str(tmp / "rng" / f"rank-{rank:05d}.safetensors"), metadata=rng_meta)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._finalise(tmp, final, step, world, groups, scheduler, trainer_state, write_adapter_config)
        acc.wait_for_everyone()
        return final

    def _finalise(self, tmp, final, step, world, groups, scheduler, trainer_state, write_adapter_config) -> None:
        expected = [tmp / sub / _shard_name(r, world) for sub in ("adapter", "optimizer") for r in range(world)]
        expected += [tmp / "rng" / f"rank-{r:05d}.safetensors" for r in range(world)]
        missing = [str(p.relative_to(tmp)) for p in expected if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {tmp}: files of other ranks did not arrive ({', '.join(missing[:3])}): checkpoint.dir must be "
                "a folder every node sees (a shared filesystem), not node-local storage"
            )
        (tmp / "optimizer" / "param_groups.json").write_text(json.dumps(groups, indent=2))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), indent=2))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (tmp / "config.yaml").write_text(render_config(self.cfg))
        base_config = Path(self.cfg.model.path) / "config.json"
        if base_config.is_file():  # lets export-adapter rebuild the model skeleton without the base weights
            shutil.copy2(base_config, tmp / "base_config.json")
        write_adapter_config(tmp / "adapter_config")
        write_manifest(tmp, step, {"world_size": world, "method": self.cfg.method.name})
        if final.exists():
            _remove(final)
        os.rename(tmp, final)
        write_atomically(self.root / LATEST, final.name)
        self._retain()
        log.info("checkpoint %s written", final)

    def _retain(self) -> None:
        steps = sorted(p for p in self.root.iterdir() if STEP_DIR.fullmatch(p.name))
        for old in steps[: -self.cfg.checkpoint.keep_last]:
            if self.protected is None or old.resolve() != self.protected.resolve():
                _remove(old)

    # ---- resume -------------------------------------------------------------------------------------------------
    def find_resume(self) -> Checkpoint | None:
        choice, checksums = self.cfg.checkpoint.resume, self.cfg.checkpoint.verify_checksums
        if choice == "none":
            return None
        if choice == "auto":
            found = complete_checkpoints(self.root, checksums)
            return found[-1] if found else None
        return verify(Path(choice), checksums)

    def load(self, ckpt: Checkpoint, model, access, scheduler, rows_per_step: int, num_rows: int) -> dict:
        """Restore everything from `ckpt` into this run; returns the saved trainer state."""
        diffs = config_differences(load_config(ckpt.path / "config.yaml"), self.cfg)
        if diffs:
            raise CheckpointError(f"{ckpt.path} was written by a different run:\n  " + "\n  ".join(diffs) + "\n  (use another training.output_dir or checkpoint.resume=none to start fresh)")
        state = json.loads((ckpt.path / "trainer_state.json").read_text())
        if state["rows_per_step"] != rows_per_step:
            raise CheckpointError(
                f"{ckpt.path}: written with {state['rows_per_step']} rows per optimizer step (micro_batch_size x processes x "
                f"gradient_accumulation_steps), this run has {rows_per_step}. Keep the global batch: with "
                f"{self.acc.num_processes} processes set micro_batch_size x gradient_accumulation_steps = "
                f"{state['rows_per_step'] / self.acc.num_processes:g}"
            )
        if state["num_train_rows"] != num_rows:
            raise CheckpointError(f"{ckpt.path}: the training data had {state['num_train_rows']} rows, now {num_rows}: the data changed")
        groups = json.loads((ckpt.path / "optimizer" / "param_groups.json").read_text())
        access.restore(trainable_parameters(model), read_shards(ckpt.path / "adapter"), read_shards(ckpt.path / "optimizer"), groups)
        scheduler.load_state_dict(json.loads((ckpt.path / "scheduler.json").read_text()))
        rng_file = ckpt.path / "rng" / f"rank-{self.acc.process_index:05d}.safetensors"
        if rng_file.is_file():
            with safe_open(str(rng_file), framework="pt") as sf:
                restore_rng({k: sf.get_tensor(k) for k in sf.keys()}, sf.metadata())
        else:  # more processes than when it was saved: this rank has no saved RNG; data order does not depend on it
            log.warning("no RNG state for rank %d in %s (saved with %d processes)", self.acc.process_index, ckpt.path, ckpt.manifest["world_size"])
        self.protected = ckpt.path
        log.info("resumed from %s (step %d, written by %d processes)", ckpt.path, ckpt.step, ckpt.manifest["world_size"])
        return state

    # ---- preemption marker --------------------------------------------------------------------------------------
    def mark_preempted(self, info: dict) -> None:
        if self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomically(self.root / PREEMPTED, json.dumps(info))

    def clear_preempted(self) -> None:
        if self.acc.is_main_process:
            (self.root / PREEMPTED).unlink(missing_ok=True)
