"""DeepSpeed ZeRO: fill its config from the recipe, and gather sharded trainable parameters for saving.

The recipe stays the single source of truth: micro-batch size, accumulation and clipping come from the ftscale
config, so an accelerate/DeepSpeed file cannot silently disagree with it."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from accelerate.utils import DistributedType
from torch import nn

from ftscale.config.distributed import DistributedConfig
from ftscale.config.training import TrainingConfig
from ftscale.distributed.fsdp import broadcast_buffers_from_rank0, local_tensor


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int | None:
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else None


def configure_deepspeed(accelerator, training: TrainingConfig, distributed: DistributedConfig) -> None:
    """Write the recipe's batch, accumulation and clipping settings into DeepSpeed's config before `prepare`."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if distributed.zero3_persistence_threshold is not None:
        ds.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = distributed.zero3_persistence_threshold
    ds["train_micro_batch_size_per_gpu"] = training.micro_batch_size
    ds["gradient_accumulation_steps"] = training.gradient_accumulation_steps
    ds.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
    ds["gradient_clipping"] = training.max_grad_norm or 0.0
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW, the same optimizer every backend uses


def gathered(params: list[nn.Parameter], accelerator, modify: bool = False):
    """Context in which every rank sees the full values of `params` (ZeRO-3 shards them; other backends don't).
    With modify=True, rank 0's changes inside the context are scattered back on exit. Collective: every rank
    must enter it."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)
    return nullcontext()


@contextmanager
def hidden_from_transformers(accelerator):
    """Load a model as if ZeRO-3 were off (transformers then accepts a device_map): for the 4-bit base, which
    `partition_from_rank0` partitions instead."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def partition_from_rank0(model: nn.Module, accelerator) -> None:
    """ZeRO-3 memory-efficient loading where transformers cannot do it (4-bit bases, which it does not load under
    zero.Init): rank 0 holds the loaded model, the other ranks a meta-device skeleton of it. Children before
    parents, each module's own parameters are allocated on the other ranks and handed to zero.Init, which
    broadcasts rank 0's values and keeps each rank's partition; so beyond its partitions a rank holds one module's
    weights at a time. Buffers are broadcast whole. Collective."""
    import deepspeed
    import torch

    from ftscale.model.quantized_skeleton import empty_like_parameter

    config = accelerator.state.deepspeed_plugin.deepspeed_config
    rank0 = accelerator.is_main_process
    allocated: dict[int, torch.nn.Parameter] = {}  # by the meta parameter's id, so tied weights stay tied
    for module in reversed(list(model.modules())):  # every descendant comes before its ancestors
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if not rank0:
            for name, p in own:
                if id(p) not in allocated:
                    allocated[id(p)] = empty_like_parameter(p, accelerator.device)
                setattr(module, name, allocated[id(p)])
        deepspeed.zero.Init(module=module, config_dict_or_path=config)
    broadcast_buffers_from_rank0(model, accelerator.device)


def frozen_bytes_on_this_rank(model: nn.Module) -> tuple[int, int]:
    """(bytes of frozen parameters this rank holds, bytes of all frozen parameters): under ZeRO-3 and FSDP2 the
    first is this rank's shard, elsewhere the two are equal."""
    local = full = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        size = p.element_size()
        full += getattr(p, "ds_numel", p.numel()) * size
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
            local += p.ds_tensor.numel() * size
        else:  # a DTensor (FSDP2) counts its local shard; a plain tensor is whole
            local += local_tensor(p).numel() * size
    return local, full
