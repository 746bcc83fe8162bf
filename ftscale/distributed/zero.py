"""DeepSpeed ZeRO-1/2/3: fill its config from the recipe, load (and for 4-bit bases partition) the base, gather
sharded trainable parameters for saving, and reach the fp32 master weights and Adam state for checkpoints.

The recipe stays the single source of truth: micro-batch size, accumulation and clipping come from the ftscale
config, so an accelerate/DeepSpeed file cannot silently disagree with it."""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ftscale.checkpoint.state import OPTIMIZER_KEYS, SEP, check_complete, trainable_parameters
from ftscale.config.distributed import DistributedConfig
from ftscale.config.training import TrainingConfig
from ftscale.distributed.backend import Backend
from ftscale.distributed.quantized_skeleton import empty_like_parameter
from ftscale.distributed.tensors import broadcast_buffers_from_rank0

log = logging.getLogger("ftscale")


class ZeroBackend(Backend):
    name = "DEEPSPEED"

    def __init__(self, accelerator, cfg):
        super().__init__(accelerator, cfg)
        plugin = accelerator.state.deepspeed_plugin
        self.stage = plugin.zero_stage
        configure_deepspeed(plugin.deepspeed_config, cfg.training, cfg.distributed)
        # transformers partitions a base while loading it under zero.Init, except a 4-bit one: ftscale does that.
        self.reads_on_rank0_only = (
            accelerator.num_processes > 1 and self.stage == 3 and plugin.zero3_init_flag and cfg.method.name == "qlora"
        )
        # ZeRO-3 traces every module through forward and backward; a head whose output is not in the loss's graph
        # fails its backward check ("active_backward_submodules is empty"), so it keeps the unchunked loss.
        self.allows_empty_head = self.stage != 3

    def load_base(self, vocab_size):
        from transformers.integrations import is_deepspeed_zero3_enabled

        # ZeRO-3 with a 4-bit base: transformers would refuse the meta device_map, so it does not see ZeRO-3.
        with hidden_from_transformers(self.acc) if self.reads_on_rank0_only else nullcontext():
            model = self._load(vocab_size, placed_by_backend=is_deepspeed_zero3_enabled())
        if self.reads_on_rank0_only:
            partition_from_rank0(model, self.acc)
            self._log_rank0_loading(log)
        if self.stage == 3:
            partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
            log.info("ZeRO-3: the base was %s", "partitioned while loading" if partitioned else "read whole, partitioned at prepare")
        return model

    @contextmanager
    def trainable_state_for_saving(self, model):
        with self.gathered([p for p in model.parameters() if p.requires_grad]):
            yield None

    def gathered(self, params: list[nn.Parameter], modify: bool = False):
        """Context in which every rank sees the full values of `params` (ZeRO-3 partitions them; ZeRO-1/2 do not).
        With modify=True, rank 0's changes inside the context are scattered back on exit. Collective."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def state_access(self, model, optimizer) -> DeepSpeedAccess:
        return DeepSpeedAccess(model, optimizer.optimizer, self)  # accelerate's wrapper -> DeepSpeed's optimizer

    def numel(self, p) -> int:
        return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter reports numel 0

    def local_numel(self, p) -> int:
        return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()


def configure_deepspeed(ds: dict, training: TrainingConfig, distributed: DistributedConfig) -> None:
    """Write the recipe's batch, accumulation and clipping settings into DeepSpeed's config before `prepare`."""
    if distributed.zero3_persistence_threshold is not None:
        ds.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = distributed.zero3_persistence_threshold
    ds["train_micro_batch_size_per_gpu"] = training.micro_batch_size
    ds["gradient_accumulation_steps"] = training.gradient_accumulation_steps
    ds.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
    ds["gradient_clipping"] = training.max_grad_norm or 0.0
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW, the same optimizer every backend uses


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


class DeepSpeedAccess:
    """ZeRO-1/2/3 checkpoint state through DeepSpeed's tensor-fragment API, which assembles and scatters one
    parameter's fp32 value and Adam state from the flat partitions. Every call is collective: all ranks walk all
    parameters in order."""

    def __init__(self, model: nn.Module, zero_optimizer, backend: ZeroBackend):
        self.params, self.zero, self.backend = trainable_parameters(model), zero_optimizer, backend

    def _inner_states(self) -> list[dict]:
        return [s for s in self.zero.optimizer.state.values() if s]

    def collect(self, mine: list[str]) -> tuple[dict, dict]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        states = self._inner_states()
        step = states[0]["step"].detach().cpu().float().reshape(()) if states else torch.tensor(0.0)
        owned, param_out, optim_out = set(mine), {}, {}
        for name in sorted(self.params):
            p = self.params[name]
            shape = tuple(getattr(p, "ds_shape", p.shape))
            value = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in OPTIMIZER_KEYS}
            if name in owned:
                param_out[name] = value.detach().cpu().reshape(shape).contiguous()
                for k, v in moments.items():
                    optim_out[f"{name}{SEP}{k}"] = v.detach().cpu().reshape(shape).contiguous()
                optim_out[f"{name}{SEP}step"] = step.clone()
        return param_out, optim_out

    def groups(self) -> list[dict]:
        names = sorted(self.params)
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": names} for g in self.zero.optimizer.param_groups]

    def _create_optimizer_state(self) -> None:
        """Before the first step AdamW has no state to write into: torch creates it lazily at the first step, and
        DeepSpeed links its per-parameter views after that. Create it now, in torch's own layout, and link it."""
        flats = getattr(self.zero, "fp32_partitioned_groups_flat", None) or self.zero.single_partition_of_fp32_groups
        for flat in flats:  # ZeRO-3 / ZeRO-1,2 flat fp32 partitions of this rank
            state = self.zero.optimizer.state[flat]
            if not state:
                state.update(
                    step=torch.zeros((), dtype=torch.float32, device=flat.device),
                    exp_avg=torch.zeros_like(flat),
                    exp_avg_sq=torch.zeros_like(flat),
                )
        if hasattr(self.zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: what DeepSpeed runs after step 1
            self.zero._lazy_init_hp_params_optimizer_state()

    def restore(self, param_tensors, optim_tensors, groups) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = self.params
        check_complete(params, param_tensors)
        self._create_optimizer_state()
        for name in sorted(params):
            p = params[name]
            safe_set_full_fp32_param(p, param_tensors[name].to(p.device))
            for k in OPTIMIZER_KEYS:
                safe_set_full_optimizer_state(p, optim_tensors[f"{name}{SEP}{k}"].to(p.device), k)
        # The fp32 masters are set; the parameters the model computes with must hold the same values.
        with self.backend.gathered(list(params.values()), modify=True), torch.no_grad():
            for name, p in params.items():
                p.data.copy_(param_tensors[name].reshape(p.shape).to(p.dtype))
        step = next(v for k, v in optim_tensors.items() if k.endswith(f"{SEP}step"))
        for state in self._inner_states():
            state["step"] = step.to(state["step"].dtype).reshape(state["step"].shape).to(state["step"].device)
        for live, saved in zip(self.zero.optimizer.param_groups, groups, strict=False):
            live.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
