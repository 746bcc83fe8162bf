"""Refuse launch set-ups that cannot work, before any model is loaded, naming what to change."""

from __future__ import annotations

import os

import torch

from ftscale.config import ConfigError, FtscaleConfig
from ftscale.distributed.fsdp import fsdp_settings


def _env(name: str) -> str:
    return os.environ.get(name, "").lower()


def check_launch(cfg: FtscaleConfig) -> None:
    """Combinations of the accelerate launch config and the recipe that cannot work. Called on every rank."""
    cuda = torch.cuda.is_available()
    if cfg.training.precision == "fp16" and not cuda:
        raise ConfigError("training.precision=fp16 needs a CUDA device; on CPU use fp32 or bf16")
    fsdp = fsdp_settings()
    if fsdp is not None and fsdp.offload_params and not cuda:
        raise ConfigError(
            "the accelerate config offloads FSDP parameters to CPU, but there is no GPU to offload from: "
            "set fsdp_config.fsdp_offload_params: false (configs/accelerate/fsdp2.yaml)"
        )
    offload = {_env("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"), _env("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")}
    if _env("ACCELERATE_USE_DEEPSPEED") == "true" and not cuda and offload & {"cpu", "nvme"}:
        raise ConfigError(
            "the accelerate config offloads DeepSpeed state to CPU/NVMe, but there is no GPU to offload from: "
            "use configs/accelerate/zero3.yaml (no offload) on a CPU-only machine"
        )


def check_process_group(accelerator) -> None:
    """Several launched processes must form one group; otherwise each would train alone and overwrite the others."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"{launched} processes were launched but accelerate formed a group of {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): check the accelerate config's distributed_type and use_cpu "
            "(configs/accelerate/ddp.yaml shows a working multi-process set-up)"
        )
