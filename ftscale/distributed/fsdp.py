"""FSDP2: torch's `fully_shard` on every decoder layer, the input embedding and the output head (untied), then on
the root module; its checkpoint state access.

ftscale applies it itself rather than through accelerate: accelerate turns FSDP on only for CUDA launches, and one
code path on CPU and GPU means the path the tests run is the path GPU jobs run. Accelerate still forms the process
group; the launch config (configs/accelerate/fsdp2.yaml) supplies the settings through the FSDP_* variables that
`accelerate launch` exports."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ftscale.checkpoint.state import OPTIMIZER_KEYS, SEP, check_complete, restore_optimizer, restore_parameters
from ftscale.config import PROMPT_METHODS
from ftscale.distributed.backend import Backend
from ftscale.distributed.ddp import PlainAccess
from ftscale.distributed.launch import FSDPSettings
from ftscale.distributed.tensors import broadcast_buffers_from_rank0, full_tensor, local_tensor, shard_like
from ftscale.model.loading import causal_lm, decoder_layers

log = logging.getLogger("ftscale")


class FSDP2Backend(Backend):
    name = "FSDP2"

    def __init__(self, accelerator, cfg, settings: FSDPSettings):
        super().__init__(accelerator, cfg)
        self.settings = settings
        # peft's prompt learning keeps a second reference to the input embedding, which FSDP2 does not shard and
        # rank 0 could not fill: those methods read the base on every rank.
        self.reads_on_rank0_only = (
            accelerator.num_processes > 1 and settings.ram_efficient_loading and cfg.method.name not in PROMPT_METHODS
        )

    def parallelize(self, model: nn.Module) -> nn.Module:
        device = self.acc.device
        values = full_values(model) if self.reads_on_rank0_only and self.acc.is_main_process else {}
        model = shard_model(model, self.settings, device)
        if self.reads_on_rank0_only:
            load_from_rank0(model, values, device)
            self._log_rank0_loading(log)
        return model

    def prepare(self, model, optimizer):
        return model, self.acc.prepare(optimizer)  # already sharded: prepare would wrap the model in DDP

    @contextmanager
    def micro_batch(self, model, k: int, n: int):
        model.set_requires_gradient_sync(k == n - 1)  # reduce-scatter gradients once per step, after the last
        with self.acc.accumulate(model):
            yield

    def after_eval(self, model) -> None:
        reshard_all(model)

    def _scalar(self, t: torch.Tensor) -> float:
        return float(full_tensor(t))

    @contextmanager
    def trainable_state_for_saving(self, model):
        with unsharded_for_saving(model):
            yield full_trainable_state_dict(model)

    def state_access(self, model, optimizer) -> FSDPAccess:
        return FSDPAccess(model, getattr(optimizer, "optimizer", optimizer))

    def local_numel(self, p) -> int:
        return local_tensor(p).numel()


class FSDPAccess(PlainAccess):
    """Each parameter and its Adam moments are DTensor shards. Gathered whole one parameter at a time (the adapter
    is small) so the format stays the same for every backend; every call is collective."""

    def collect(self, mine: list[str]) -> tuple[dict, dict]:
        owned, param_out, optim_out = set(mine), {}, {}
        for name in sorted(self.params):
            value = full_tensor(self.params[name].detach())
            moments = {k: full_tensor(v) for k, v in self.optimizer.state.get(self.params[name], {}).items()}
            if name in owned:
                param_out[name] = value.cpu().contiguous()
                for k, v in moments.items():
                    optim_out[f"{name}{SEP}{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        return param_out, optim_out

    def restore(self, param_tensors, optim_tensors, groups) -> None:
        params = self.params
        check_complete(params, param_tensors)
        restore_parameters(params, {n: shard_like(param_tensors[n], p) for n, p in params.items()})
        # Moments are laid out like their parameter; the step count is a plain scalar.
        moments = {}
        for key, value in optim_tensors.items():
            name, field = key.split(SEP)
            moments[key] = shard_like(value, params[name]) if field in OPTIMIZER_KEYS else value
        restore_optimizer(self.optimizer, params, moments, groups)


def shard_model(model: nn.Module, settings: FSDPSettings, device: torch.device) -> nn.Module:
    """Shard in place: each decoder layer a unit of its own, and so are the input embedding and the output head of
    an untied model; every rank must hold the same values before (seeded init)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = CPUOffloadPolicy() if settings.offload_params else OffloadPolicy()
    reshard = settings.reshard_after_forward
    embedding, head = separate_embedding_and_head(model)
    if embedding is not None:  # first in forward, last in backward (a frozen one fed token ids has none): as a layer
        fully_shard(embedding, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload)
    for layer in decoder_layers(model, "FSDP2 shards by"):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload)
    if head is not None:  # as a layer too: a frozen head under the default chunked loss has no backward at all
        fully_shard(head, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload)
    for encoder in prompt_encoders(model):  # a unit of its own, so saving can gather it alone (see unsharded)
        fully_shard(encoder, mesh=mesh, reshard_after_forward=False, offload_policy=offload)
    # The root unit holds the rest: the final norm (small), and embedding and head when tied. Backward starts with
    # them, so keep them.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, offload_policy=offload)
    return model


def separate_embedding_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input embedding, output head) to shard as units of their own, or (None, None) to leave them to the root
    unit: when the model has no head, or when they share one Parameter (tied), which only one unit can own."""
    inner = causal_lm(model)
    embedding = inner.get_input_embeddings() if inner is not None else None
    head = inner.get_output_embeddings() if inner is not None else None
    if embedding is None or head is None or embedding.weight is head.weight:
        return None, None
    return embedding, head


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


def prompt_encoders(model: nn.Module) -> list[nn.Module]:
    """peft's prompt-learning encoders (prompt tuning, prefix tuning, P-tuning), which peft runs to save them."""
    return list(getattr(model, "prompt_encoder", {}).values()) if isinstance(getattr(model, "prompt_encoder", None), nn.ModuleDict) else []


@contextmanager
def unsharded_for_saving(model: nn.Module):
    """peft saves prompt-learning adapters by running their encoder, on rank 0 only: gather those (small) units on
    every rank first, so that forward needs no collective. Collective: every rank must enter."""
    encoders = prompt_encoders(model)
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


def full_trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole values of the trainable parameters only, on every rank: the frozen base is never gathered."""
    return {n: full_tensor(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
