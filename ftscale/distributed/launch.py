"""The launch settings of this process, read once from what `accelerate launch` (or torchrun, or srun through
slurm/launch_node.sh) exported: how many processes, which backend, and that backend's options.

Every other module asks these settings instead of reading the environment itself."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from ftscale.config import ConfigError

BackendName = Literal["ddp", "fsdp2", "deepspeed"]  # ddp also covers a single process


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool  # free a layer's gathered weights after its forward (recomputed in backward)
    offload_params: bool  # sharded parameters and optimizer state in CPU memory
    ram_efficient_loading: bool  # rank 0 reads the checkpoint; the other ranks start on the meta device


@dataclass(frozen=True)
class LaunchSettings:
    backend: BackendName
    fsdp: FSDPSettings | None  # set when backend == "fsdp2"
    deepspeed_offload: frozenset[str]  # devices DeepSpeed offloads state to ("cpu", "nvme"); empty: none
    # The process's own memory allocator settings ("LD_PRELOAD=...", MALLOC_* variables, GLIBC_TUNABLES' malloc
    # entries), which ftscale's own tuning leaves alone (ftscale/training/host_memory.py); empty: glibc's defaults.
    allocator: tuple[str, ...] = ()


def is_first_process(env=os.environ) -> bool:
    """Whether this is the launch's rank 0 (or not launched at all): the one that prints results."""
    return env.get("RANK", "0") == "0"


def processes_on_this_node(env=os.environ) -> int:
    """Processes the launcher started on this machine (LOCAL_WORLD_SIZE; 1 when not launched)."""
    return int(env.get("LOCAL_WORLD_SIZE", "1"))


def launched_processes(env=os.environ) -> int:
    """Processes launched (WORLD_SIZE). Read once the Accelerator exists: accelerate fills it in from MPI's variables."""
    return int(env.get("WORLD_SIZE", "1"))


def _flag(env, name: str, default: str) -> bool:
    return env.get(name, default).lower() == "true"


def read_launch_settings(env=os.environ) -> LaunchSettings:
    """The settings of this launch. An FSDP version ftscale does not run is a ConfigError naming the fix."""
    fsdp = None
    if _flag(env, "ACCELERATE_USE_FSDP", "false"):
        if env.get("FSDP_VERSION", "2") != "2":
            raise ConfigError("the accelerate config selects FSDP version 1: ftscale runs FSDP2; set fsdp_config.fsdp_version: 2")
        fsdp = FSDPSettings(
            reshard_after_forward=_flag(env, "FSDP_RESHARD_AFTER_FORWARD", "true"),
            offload_params=_flag(env, "FSDP_OFFLOAD_PARAMS", "false"),
            ram_efficient_loading=_flag(env, "FSDP_CPU_RAM_EFFICIENT_LOADING", "true"),
        )
    deepspeed = _flag(env, "ACCELERATE_USE_DEEPSPEED", "false")
    offload = {env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "").lower() for what in ("OPTIMIZER", "PARAM")}
    return LaunchSettings(
        backend="fsdp2" if fsdp else "deepspeed" if deepspeed else "ddp",
        fsdp=fsdp,
        deepspeed_offload=frozenset(offload & {"cpu", "nvme"}) if deepspeed else frozenset(),
        allocator=allocator_settings(env),
    )


def allocator_settings(env=os.environ) -> tuple[str, ...]:
    preloaded = env.get("LD_PRELOAD", "")
    found = [f"LD_PRELOAD={preloaded}"] if any(name in preloaded for name in ("jemalloc", "tcmalloc", "mimalloc")) else []
    found += sorted(k for k in env if k.startswith("MALLOC_"))
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        found.append("GLIBC_TUNABLES")
    return tuple(found)
