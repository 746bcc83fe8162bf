"""FSDP2: torch's `fully_shard` on every decoder layer, then on the root module.

ftscale applies it itself rather than through accelerate: accelerate turns FSDP on only for CUDA launches, and one
code path on CPU and GPU means the path the tests run is the path GPU jobs run. Accelerate still forms the process
group; the launch config (configs/accelerate/fsdp2.yaml) supplies the settings through the FSDP_* variables that
`accelerate launch` exports."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ftscale.config import ConfigError


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool  # free a layer's gathered weights after its forward (recomputed in backward)
    offload_params: bool  # sharded parameters and optimizer state in CPU memory
    ram_efficient_loading: bool  # rank 0 reads the checkpoint; the other ranks start on the meta device


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).lower() == "true"


def fsdp_settings() -> FSDPSettings | None:
    """The FSDP settings of this launch, or None when the accelerate config does not select FSDP."""
    if not _flag("ACCELERATE_USE_FSDP", "false"):
        return None
    if os.environ.get("FSDP_VERSION", "2") != "2":
        raise ConfigError("the accelerate config selects FSDP version 1: ftscale runs FSDP2; set fsdp_config.fsdp_version: 2")
    return FSDPSettings(
        reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        offload_params=_flag("FSDP_OFFLOAD_PARAMS", "false"),
        ram_efficient_loading=_flag("FSDP_CPU_RAM_EFFICIENT_LOADING", "true"),
    )


@contextmanager
def accelerate_without_fsdp():
    """Build the Accelerator as for DDP (process group, device, autocast) without accelerate wrapping the model."""
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: transformers names them in `_no_split_modules`."""
    names = next((set(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), set())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"FSDP2: {type(model).__name__} declares no decoder layer class (_no_split_modules) to shard by")
    return layers


def shard_model(model: nn.Module, settings: FSDPSettings, device: torch.device) -> nn.Module:
    """Shard in place, each layer a unit of its own; every rank must hold the same values before (seeded init)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = CPUOffloadPolicy() if settings.offload_params else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, offload_policy=offload)
    for encoder in prompt_encoders(model):  # a unit of its own, so saving can gather it alone (see unsharded)
        fully_shard(encoder, mesh=mesh, reshard_after_forward=False, offload_policy=offload)
    # The root unit holds embeddings, final norm and head (tied or not); backward needs them first, so keep them.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, offload_policy=offload)
    return model


def full_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0's parameters by name, taken before sharding (references, not copies)."""
    return {n: p.detach() for n, p in model.named_parameters()}


def load_from_rank0(model: nn.Module, values: dict[str, torch.Tensor], device: torch.device) -> None:
    """After `shard_model`: rank 0 holds the real values (`values`, from `full_values` before sharding); the other
    ranks were built on the meta device. Each parameter is scattered from rank 0 one at a time, so a rank never
    holds more than its shards plus one whole tensor; buffers (rotary frequencies) are broadcast whole. Collective."""
    rank0 = dist.get_rank() == 0
    if not rank0:
        model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            source = values[name] if rank0 else torch.empty(p.shape, dtype=p.dtype, device=device)
            local_tensor(p).copy_(local_tensor(shard_like(source, p, from_rank0=True)))
    broadcast_buffers_from_rank0(model, device)


def broadcast_buffers_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Every buffer whole, as rank 0 holds it; buffers still on the meta device are allocated first. Collective.
    Buffers are never sharded (FSDP2 and ZeRO-3 alike), and non-persistent ones are in no state dict."""
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            buffer = model.get_submodule(owner)._buffers[attr] = torch.empty_like(buffer, device=device)
        dist.broadcast(buffer, src=0)


def prompt_encoders(model: nn.Module) -> list[nn.Module]:
    """peft's prompt-learning encoders (prompt tuning, prefix tuning, P-tuning), which peft runs to save them."""
    return list(getattr(model, "prompt_encoder", {}).values()) if isinstance(getattr(model, "prompt_encoder", None), nn.ModuleDict) else []


@contextmanager
def unsharded_for_saving(model: nn.Module):
    """peft saves prompt-learning adapters by running their encoder, on rank 0 only: gather those (small) units on
    every rank first, so that forward needs no collective. Collective: every rank must enter."""
    encoders = prompt_encoders(model) if is_sharded(model) else []
    for encoder in encoders:
        encoder.unshard()
    try:
        yield
    finally:
        for encoder in encoders:
            encoder.reshard()


def reshard_all(model: nn.Module) -> None:
    """Units kept gathered after forward (the root, prompt encoders) stay gathered after a forward without backward
    (evaluation); free them, so parameters are the sharded ones the optimizer and checkpoints refer to."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


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


def full_trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole values of the trainable parameters only, on every rank: the frozen base is never gathered."""
    return {n: full_tensor(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
