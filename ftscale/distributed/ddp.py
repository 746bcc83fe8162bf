"""One process, or DDP: every rank holds whole parameters and the torch optimizer's own state."""

from __future__ import annotations

import torch
from torch import nn

from ftscale.checkpoint.state import (
    optimizer_groups,
    optimizer_tensors,
    parameter_tensors,
    restore_optimizer,
    restore_parameters,
    trainable_parameters,
)
from ftscale.distributed.backend import Backend


class PlainAccess:
    """Checkpoint state access where every rank holds full tensors (also the base of FSDPAccess)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.params, self.optimizer = trainable_parameters(model), optimizer

    def collect(self, mine: list[str]) -> tuple[dict, dict]:
        return parameter_tensors(self.params, mine), optimizer_tensors(self.optimizer, self.params, mine)

    def groups(self) -> list[dict]:
        return optimizer_groups(self.optimizer, self.params)

    def restore(self, param_tensors, optim_tensors, groups) -> None:
        restore_parameters(self.params, param_tensors)
        restore_optimizer(self.optimizer, self.params, optim_tensors, groups)


class DDPBackend(Backend):
    """Replicated: the defaults of `Backend`, accelerate's DDP wrapper where there are several processes."""

    def __init__(self, accelerator, cfg):
        super().__init__(accelerator, cfg)
        self.name = accelerator.distributed_type.value  # NO, MULTI_CPU, MULTI_GPU

    def state_access(self, model, optimizer) -> PlainAccess:
        return PlainAccess(model, getattr(optimizer, "optimizer", optimizer))  # accelerate's wrapper -> torch's
