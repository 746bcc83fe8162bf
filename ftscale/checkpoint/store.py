"""Save and resume training checkpoints: every rank writes its shard into a partial folder, rank 0 checks that
every rank's files arrived, writes the manifest, renames the folder into place and updates `latest`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from ftscale.atomic_files import (
    partial_folder,
    partial_path,
    recover_folder,
    remove_folder,
    replace_folder,
    write_text_atomically,
)
from ftscale.checkpoint.layout import (
    ADAPTER,
    ADAPTER_CONFIG,
    BASE_CONFIG,
    CONFIG,
    LATEST,
    MANIFEST,
    OPTIMIZER,
    PARAM_GROUPS,
    PREEMPTED,
    RNG,
    SCHEDULER,
    STEP_DIR,
    SUPERSEDED,
    TRAINER_STATE,
    WANDB_RUN_ID,
    Checkpoint,
    CheckpointError,
    complete_checkpoints,
    rng_name,
    shard_name,
    step_dir_name,
    verify,
    write_manifest,
)
from ftscale.checkpoint.preemption import Preempted, PreemptionWatcher
from ftscale.checkpoint.state import StateAccess, owned_names, restore_rng, rng_state
from ftscale.checkpoint.trainer_state import TrainerState
from ftscale.config import FtscaleConfig, load_config, render_config
from ftscale.data.sampler import StepSampler
from ftscale.json_files import read_json
from ftscale.safetensors_stream import load_safetensors

log = logging.getLogger("ftscale")

# Settings a resumed run must share with its checkpoint: the model and adapter shape, and everything that decides
# which rows each step sees. Others (learning rate, logging, max_steps) may change between runs.
IDENTITY_KEYS = (
    "model.path",
    "method.",
    "data.train",
    "data.eval_fraction",
    "data.max_seq_len",
    "data.packing",
    "data.train_on",
    "data.overlong",
    "training.seed",
)


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


def _run_id_of(step_dir: Path) -> str | None:
    """The run id in a checkpoint's manifest; None for one written before runs had ids or without a readable one."""
    try:
        manifest = read_json(step_dir / MANIFEST, CheckpointError)
    except CheckpointError:
        return None
    return manifest.get("run_id") if isinstance(manifest, dict) else None


class CheckpointStore:
    """Built once per run with everything a checkpoint reads and restores; then `maybe_save(state, ...)` each step
    and `load(ckpt)` on resume take only the trainer state. Collective methods say so."""

    def __init__(
        self,
        cfg: FtscaleConfig,
        accelerator,
        access: StateAccess,
        scheduler,
        write_adapter_config: Callable[[Path], None],
        sampler: StepSampler,
        preemption: PreemptionWatcher,
    ):
        self.cfg, self.acc, self.access, self.scheduler = cfg, accelerator, access, scheduler
        self.write_adapter_config, self.sampler, self.preemption = write_adapter_config, sampler, preemption
        self.root = Path(cfg.checkpoint.dir or Path(cfg.training.output_dir) / "checkpoints")
        self.protected: Path | None = None  # the checkpoint this run resumed from: retention never deletes it
        self.run_id: str | None = None  # set by start(): the identity every checkpoint of this run carries
        self._own_legacy = False  # resumed from a checkpoint written before runs had ids: those count as this run's
        self._last_save = time.monotonic()  # for checkpoint.every_minutes

    # ---- run identity -------------------------------------------------------------------------------------------
    def start(self, resumed: Checkpoint | None) -> str:
        """Fix this run's identity and make the folder hold only its checkpoints. A resumed run keeps the id of the
        checkpoint it resumed from; a fresh one gets a new id. Checkpoints of any other run (a fresh start in an old
        output folder, or an auto-resume that found only broken checkpoints) are moved to `superseded/`, so that
        retention can never delete this run's new checkpoints in favour of another run's higher step numbers.
        Collective: every rank calls it; rank 0 does the file work."""
        self._own_legacy = resumed is not None and resumed.run_id is None
        if resumed is not None and resumed.run_id is not None:
            run_id = resumed.run_id
        elif resumed is not None:  # a checkpoint from before run ids: its W&B id, if any, was kept beside it
            id_file = Path(self.cfg.training.output_dir) / WANDB_RUN_ID
            kept = id_file.read_text(errors="replace").strip() if id_file.is_file() else ""
            run_id = kept if re.fullmatch(r"[a-z0-9]{1,64}", kept) else secrets.token_hex(4)
        else:
            run_id = secrets.token_hex(4)  # W&B ids are short lowercase alphanumerics; this doubles as one
        self.run_id = broadcast_object_list([run_id])[0] if self.acc.num_processes > 1 else run_id  # rank 0's
        if self.acc.is_main_process and self.root.is_dir():
            self._set_aside(resumed)
            (self.root / PREEMPTED).unlink(missing_ok=True)  # this run takes over from the preempted one
        self.acc.wait_for_everyone()
        return self.run_id

    def _owns(self, step_dir: Path) -> bool:
        run = _run_id_of(step_dir)
        return run == self.run_id or (run is None and self._own_legacy and (step_dir / MANIFEST).is_file())

    def _clean_leftovers(self) -> None:
        """What a crash left: partial saves and interrupted deletions are dropped (never loaded); a checkpoint caught
        mid-replacement is put back (recover_folder)."""
        for p in self.root.iterdir():
            if not (p.is_dir() and p.name.startswith(".")):
                continue
            if p.name.endswith(".partial") or p.name.startswith(".deleting-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.endswith(".previous"):
                recover_folder(self.root / p.name[1 : -len(".previous")])

    def _set_aside(self, resumed: Checkpoint | None) -> None:
        """Move other runs' checkpoints, and this run's past the one it resumed from (a future that was given up:
        broken ones, or newer ones when resuming from an older checkpoint on purpose), out of retention's way."""
        after = resumed.step if resumed is not None else -1
        foreign = [
            p for p in sorted(self.root.iterdir()) if (m := STEP_DIR.fullmatch(p.name)) and (not self._owns(p) or int(m.group(1)) > after)
        ]
        if not foreign:
            return
        dest = self.root / SUPERSEDED / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.run_id}"
        while dest.exists():  # the same run set aside twice within a second
            dest = dest.with_name(dest.name + "+")
        dest.mkdir(parents=True)
        for p in foreign:
            os.rename(p, dest / p.name)
        if (self.root / LATEST).is_file():
            os.rename(self.root / LATEST, dest / LATEST)
        log.warning(
            "%d checkpoint(s) of another run, or past the one resumed from, in %s moved to %s (this is run %s; set "
            "checkpoint.resume to a checkpoint folder to continue one of them instead)",
            len(foreign),
            self.root,
            dest,
            self.run_id,
        )

    # ---- save ---------------------------------------------------------------------------------------------------
    def start_clock(self) -> None:
        """checkpoint.every_minutes counts from here (the start of the training loop) and from each save."""
        self._last_save = time.monotonic()

    def local_triggers(self) -> tuple[bool, bool]:
        """(a preemption signal arrived here, a wall-clock save is due here): signals and clocks differ between
        ranks, so the recipe agrees on them over all ranks before `maybe_save`."""
        ck = self.cfg.checkpoint
        timed = ck.every_minutes is not None and time.monotonic() - self._last_save >= 60 * ck.every_minutes
        return self.preemption.received is not None, timed

    def maybe_save(self, state: TrainerState, preempted: bool, timed: bool) -> None:
        """Save if one is due after this step, which is not the last: preemption (then raises Preempted, for
        requeue), checkpoint.every_steps or checkpoint.every_minutes. The last step is saved by the caller after the
        final evaluation. Collective; `preempted` and `timed` must be the same on every rank."""
        if preempted:
            path = self.save(state)
            signal_name = self.preemption.received or "a signal on another rank"
            if self.acc.is_main_process:
                write_text_atomically(
                    self.root / PREEMPTED, json.dumps({"step": state.step, "signal": signal_name, "checkpoint": str(path)})
                )
            raise Preempted(state.step, signal_name, str(path))
        every = self.cfg.checkpoint.every_steps
        if timed or (every and state.step % every == 0):
            self.save(state)

    def save(self, state: TrainerState) -> Path:
        """Write a checkpoint of `state.step`. Collective: every rank must call it."""
        acc, rank, world, step = self.acc, self.acc.process_index, self.acc.num_processes, state.step
        final = self.root / step_dir_name(step)
        tmp = partial_path(final)
        log.debug("checkpoint step %d: writing shards", step)
        if acc.is_main_process:
            partial_folder(final)  # a partial folder from a crash: never loaded, safe to drop
        acc.wait_for_everyone()
        param_tensors, optim_tensors = self.access.collect(owned_names(list(self.access.params), rank, world))
        groups = self.access.groups()
        for sub in (ADAPTER, OPTIMIZER, RNG):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        save_file(param_tensors, str(tmp / ADAPTER / shard_name(rank, world)))
        save_file(optim_tensors, str(tmp / OPTIMIZER / shard_name(rank, world)))
        rng, rng_meta = rng_state()
        save_file(rng, str(tmp / RNG / rng_name(rank)), metadata=rng_meta)
        acc.wait_for_everyone()
        if acc.is_main_process:
            epoch, offset = self.sampler.position(step)
            stamped = dataclasses.replace(
                state,
                epoch=epoch,
                sample_offset=offset,
                rows_per_step=self.sampler.rows_per_step,
                world_size=world,
                num_train_rows=len(self.sampler.rows),
                run_id=self.run_id,
            )
            self._finalise(tmp, final, stamped, groups)
        acc.wait_for_everyone()
        self._last_save = time.monotonic()
        return final

    def _finalise(self, tmp: Path, final: Path, state: TrainerState, groups: list[dict]) -> None:
        world = state.world_size
        expected = [tmp / sub / shard_name(r, world) for sub in (ADAPTER, OPTIMIZER) for r in range(world)]
        expected += [tmp / RNG / rng_name(r) for r in range(world)]
        missing = [str(p.relative_to(tmp)) for p in expected if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {tmp}: files of other ranks did not arrive ({', '.join(missing[:3])}): checkpoint.dir must be "
                "a folder every node sees (a shared filesystem), not node-local storage"
            )
        (tmp / PARAM_GROUPS).write_text(json.dumps(groups, indent=2))
        (tmp / SCHEDULER).write_text(json.dumps(self.scheduler.state_dict(), indent=2))
        (tmp / TRAINER_STATE).write_text(state.to_json())
        (tmp / CONFIG).write_text(render_config(self.cfg))
        base_config = Path(self.cfg.model.path) / "config.json"
        if base_config.is_file():  # lets export-adapter rebuild the model skeleton without the base weights
            shutil.copy2(base_config, tmp / BASE_CONFIG)
        self.write_adapter_config(tmp / ADAPTER_CONFIG)
        write_manifest(tmp, state.step, {"world_size": world, "method": self.cfg.method.name, "run_id": self.run_id})
        log.debug("checkpoint step %d: manifest written, renaming into place", state.step)
        replace_folder(tmp, final)
        write_text_atomically(self.root / LATEST, final.name)
        self._retain()
        log.info("checkpoint %s written", final)

    def _retain(self) -> None:
        """Keep this run's newest `keep_last` checkpoints (and the one it resumed from); other runs' are not ours."""
        mine = sorted(p for p in self.root.iterdir() if STEP_DIR.fullmatch(p.name) and self._owns(p))
        for old in mine[: -self.cfg.checkpoint.keep_last]:
            if self.protected is None or old.resolve() != self.protected.resolve():
                remove_folder(old)

    # ---- resume -------------------------------------------------------------------------------------------------
    def find_resume(self) -> Checkpoint | None:
        """Collective. Rank 0 finishes what a crash left (so an interrupted swap never hides a checkpoint), chooses
        the checkpoint, checksums included, and tells the others: every rank resumes from the same one, and the
        folder is read and hashed once, not once per rank. The others then check that they see it too (a
        checkpoint folder that is not shared between nodes fails here, naming the path)."""
        choice, checksums = self.cfg.checkpoint.resume, self.cfg.checkpoint.verify_checksums
        if choice == "none":
            return None
        decision: tuple[str | None, str | None] = (None, None)  # (chosen path, error)
        if self.acc.is_main_process:
            try:
                if self.root.is_dir():
                    self._clean_leftovers()
                found = complete_checkpoints(self.root, checksums) if choice == "auto" else [verify(Path(choice), checksums)]
                decision = (str(found[-1].path) if found else None, None)
            except CheckpointError as e:
                decision = (None, str(e))
        if self.acc.num_processes > 1:
            decision = broadcast_object_list([decision])[0]
        path, error = decision
        if error:
            raise CheckpointError(error)
        return verify(Path(path), checksums=False) if path else None

    def load(self, ckpt: Checkpoint) -> TrainerState:
        """Restore everything from `ckpt` into this run (parameters, optimizer, schedule, this rank's RNG); returns
        the saved trainer state. Collective."""
        log.info("resuming from %s", ckpt.path)
        diffs = config_differences(load_config(ckpt.path / CONFIG), self.cfg)
        if diffs:
            raise CheckpointError(
                f"{ckpt.path} was written by a different run:\n  "
                + "\n  ".join(diffs)
                + "\n  (use another training.output_dir or checkpoint.resume=none to start fresh)"
            )
        state = TrainerState.from_json(ckpt.read_json(TRAINER_STATE), str(ckpt.path))
        problem = self.sampler.resume_problem(state.rows_per_step, state.num_train_rows)
        if problem:
            raise CheckpointError(f"{ckpt.path}: {problem}")
        self.access.restore(ckpt.read_tensors(ADAPTER), ckpt.read_tensors(OPTIMIZER), ckpt.read_json(PARAM_GROUPS))
        self.scheduler.load_state_dict(ckpt.read_json(SCHEDULER))
        rng_file = ckpt.path / RNG / rng_name(self.acc.process_index)
        if rng_file in ckpt.listed(RNG):
            restore_rng(*load_safetensors(rng_file))
        else:  # more processes than when it was saved: this rank has no saved RNG; data order does not depend on it
            log.warning(
                "no RNG state for rank %d in %s (saved with %d processes)", self.acc.process_index, ckpt.path, ckpt.manifest["world_size"]
            )
        self.protected = ckpt.path
        log.info("resumed from %s (step %d, written by %d processes)", ckpt.path, ckpt.step, ckpt.manifest["world_size"])
        return state
