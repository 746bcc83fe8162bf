"""AdamW over the trainable parameters and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from ftscale.config.training import TrainingConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    impl = cfg.optimizer_impl
    if impl == "auto":
        # Fused AdamW exists for CUDA and (since torch 2.4) CPU; it needs floating-point params on one device type.
        impl = "fused" if device.type in ("cuda", "cpu") and all(p.is_floating_point() for p in params) else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, **kwargs)


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    return math.ceil(cfg.warmup_steps * total_steps) if cfg.warmup_steps < 1 else int(cfg.warmup_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps), num_training_steps=total_steps)
