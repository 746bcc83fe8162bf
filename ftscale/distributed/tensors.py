"""Tensor helpers the backends share: whole values and local shards of DTensors, laying a whole tensor out like a
sharded one, broadcasting buffers from rank 0."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded tensor (collective: every rank must call it), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, like: torch.Tensor, from_rank0: bool = False) -> torch.Tensor:
    """`value` (a whole tensor) laid out as `like`: its shard when `like` is a DTensor. from_rank0: only rank 0's
    `value` is real, and the others receive theirs (collective); otherwise every rank holds the same `value`."""
    if not isinstance(like, DTensor):
        if from_rank0:
            dist.broadcast(value, src=0)
        return value.to(like.device)
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=0 if from_rank0 else None)


def broadcast_buffers_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Every buffer whole, as rank 0 holds it; buffers still on the meta device are allocated first. Collective.
    Buffers are never sharded (FSDP2 and ZeRO-3 alike), and non-persistent ones are in no state dict."""
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            buffer = model.get_submodule(owner)._buffers[attr] = torch.empty_like(buffer, device=device)
        dist.broadcast(buffer, src=0)
