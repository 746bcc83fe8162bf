"""Build the Accelerator for a recipe: the process group, its backend on CPU-only machines, and the checks that
must pass before any model is loaded."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

from ftscale.config import FtscaleConfig
from ftscale.distributed.checks import check_launch, check_process_group
from ftscale.distributed.launch import LaunchSettings

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def build_accelerator(cfg: FtscaleConfig, launch: LaunchSettings) -> Accelerator:
    check_launch(cfg, launch)
    # Without CUDA, processes form a gloo group on the CPU. Accelerate needs cpu=True for that, except under
    # DeepSpeed, which it disables when cpu=True: there the backend must be named instead.
    cpu_only = not torch.cuda.is_available()
    deepspeed = launch.backend == "deepspeed"
    group = InitProcessGroupKwargs(
        timeout=timedelta(seconds=cfg.distributed.collective_timeout_s), backend="gloo" if cpu_only and deepspeed else None
    )
    # FSDP2 is applied by ftscale (ftscale/distributed/fsdp.py); accelerate only forms the group.
    with _accelerate_without_fsdp():
        accelerator = Accelerator(
            cpu=cpu_only and not deepspeed,
            mixed_precision=MIXED_PRECISION[cfg.training.precision],
            gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
            kwargs_handlers=[group],
        )
    check_process_group(accelerator)
    return accelerator


@contextmanager
def _accelerate_without_fsdp():
    """Build the Accelerator as for DDP (process group, device, autocast) without accelerate wrapping the model."""
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved
