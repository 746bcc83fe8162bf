"""Refuse launch set-ups that cannot work, before any model is loaded, naming what to change."""

from __future__ import annotations

import torch

from ftscale.config import ConfigError, FtscaleConfig
from ftscale.distributed.launch import LaunchSettings, launched_processes


def check_launch(cfg: FtscaleConfig, launch: LaunchSettings) -> None:
    """Combinations of the accelerate launch config and the recipe that cannot work. Called on every rank."""
    cuda = torch.cuda.is_available()
    if cfg.training.precision == "fp16" and not cuda:
        raise ConfigError("training.precision=fp16 needs a CUDA device; on CPU use fp32 or bf16")
    if launch.fsdp is not None and launch.fsdp.offload_params and not cuda:
        raise ConfigError(
            "the accelerate config offloads FSDP parameters to CPU, but there is no GPU to offload from: "
            "set fsdp_config.fsdp_offload_params: false (configs/accelerate/fsdp2.yaml)"
        )
    if launch.deepspeed_offload and not cuda:
        raise ConfigError(
            "the accelerate config offloads DeepSpeed state to CPU/NVMe, but there is no GPU to offload from: "
            "use configs/accelerate/zero3.yaml (no offload) on a CPU-only machine"
        )


def check_process_group(accelerator) -> None:
    """Several launched processes must form one group; otherwise each would train alone and overwrite the others."""
    launched = launched_processes()
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"{launched} processes were launched but accelerate formed a group of {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): check the accelerate config's distributed_type and use_cpu "
            "(configs/accelerate/ddp.yaml shows a working multi-process set-up)"
        )
