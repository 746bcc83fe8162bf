"""Give a meta-device 4-bit model the layout of rank 0's quantised one, so that FSDP2 or ZeRO-3 can shard it before
any weight arrives.

transformers builds the same Linear4bit modules on every rank (`device_map={"": "meta"}`), but without reading the
weights it cannot know their packed shape (4-bit values packed into the storage dtype) or their quantisation state
(absmax blocks, NF4 code, nested statistics). Rank 0 quantised the real weights, so both come from it: the shapes
and dtypes of every parameter and each Linear4bit's QuantState, broadcast once. The packed values themselves
arrive later as shards (ftscale.distributed.fsdp.load_from_rank0, ftscale.distributed.zero.partition_from_rank0).
bitsandbytes has no API for this."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _linear4bit_modules(model: nn.Module) -> dict[str, nn.Module]:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def match_rank0_quantized_layout(model: nn.Module, device: torch.device) -> None:
    """Collective. Rank 0 holds the quantised model; on the other ranks (built on the meta device) each 4-bit weight
    becomes a meta Params4bit of rank 0's packed shape and dtype, and each module gets rank 0's QuantState."""
    from bitsandbytes.functional import QuantState

    modules = _linear4bit_modules(model)
    payload = [None]
    if dist.get_rank() == 0:
        payload = [
            {name: (tuple(m.weight.shape), m.weight.dtype, m.weight.quant_state.as_dict(packed=True)) for name, m in modules.items()}
        ]
    dist.broadcast_object_list(payload, src=0)
    if dist.get_rank() == 0:
        return
    for name, (shape, dtype, state) in payload[0].items():
        module = modules[name]
        quant_state = QuantState.from_dict({k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}, device)
        module.weight = _params4bit(torch.empty(shape, dtype=dtype, device="meta"), module.weight, quant_state)
        # FSDP2 replaces the parameter with a plain DTensor; bitsandbytes then recovers the state from the module.
        module.quant_state = quant_state


def _params4bit(data: torch.Tensor, like, quant_state) -> nn.Parameter:
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(
        data,
        requires_grad=False,
        quant_state=quant_state,
        blocksize=like.blocksize,
        compress_statistics=like.compress_statistics,
        quant_type=like.quant_type,
        quant_storage=data.dtype,
        module=like.module,
        bnb_quantized=True,
    )


def empty_like_parameter(p: nn.Parameter, device: torch.device) -> nn.Parameter:
    """A parameter of p's kind, shape and dtype with uninitialised values on `device`. A 4-bit weight stays a
    Params4bit with its quantisation state: replacing it by a plain parameter would make bitsandbytes swap in a
    new one at the first forward, behind the back of any sharding that tracks the old one."""
    import bitsandbytes as bnb

    data = torch.empty(p.shape, dtype=p.dtype, device=device)
    if isinstance(p, bnb.nn.Params4bit):
        return _params4bit(data, p, p.quant_state)
    return nn.Parameter(data, requires_grad=p.requires_grad)
