"""Build the Accelerator for a recipe: the process group, its backend on CPU-only machines, and the checks that
must pass before any model is loaded."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

from ftscale.config import FtscaleConfig
from ftscale.distributed.checks import check_launch, check_process_group
from ftscale.distributed.fsdp import accelerate_without_fsdp

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def build_accelerator(cfg: FtscaleConfig) -> Accelerator:
    check_launch(cfg)
    # Without CUDA, processes form a gloo group on the CPU. Accelerate needs cpu=True for that, except under
    # DeepSpeed, which it disables when cpu=True: there the backend must be named instead.
    cpu_only = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    group = InitProcessGroupKwargs(
        timeout=timedelta(seconds=cfg.distributed.collective_timeout_s), backend="gloo" if cpu_only and deepspeed else None
    )
    # FSDP2 is applied by the recipe (ftscale/distributed/fsdp.py); accelerate only forms the group.
    with accelerate_without_fsdp():
        accelerator = Accelerator(
            cpu=cpu_only and not deepspeed,
            mixed_precision=MIXED_PRECISION[cfg.training.precision],
            gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
            kwargs_handlers=[group],
        )
    check_process_group(accelerator)
    return accelerator
