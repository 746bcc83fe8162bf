"""The one interface the recipe has to its parallelism backend.

The recipe never names FSDP or ZeRO: it asks its `Backend` to load the base, parallelize the model once the adapter
is attached, prepare model and optimizer, run each micro-batch, and hand checkpoints and the final adapter the
trainable state. Three implementations, one module each: `DDPBackend` (one process or DDP, ddp.py),
`FSDP2Backend` (fsdp.py) and `ZeroBackend` (DeepSpeed ZeRO-1/2/3, zero.py). The defaults below are the replicated
behaviour (every rank holds whole tensors); the sharded backends override what differs."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ftscale.checkpoint.state import StateAccess
from ftscale.config import FtscaleConfig
from ftscale.distributed.launch import LaunchSettings
from ftscale.distributed.quantized_skeleton import match_rank0_quantized_layout
from ftscale.model.loading import load_base_model


class Backend:
    name: str  # as the log names it

    def __init__(self, accelerator, cfg: FtscaleConfig):
        self.acc, self.cfg = accelerator, cfg
        # Memory-efficient loading: rank 0 reads the weights, the other ranks build the model on the meta device
        # and receive only their shards. Set by the backends that do it.
        self.reads_on_rank0_only = False
        # Whether a module's forward may be handed an empty batch by a hook (the chunked loss does that to the
        # output head) without upsetting the backend's own per-module bookkeeping.
        self.allows_empty_head = True

    # ---- model ------------------------------------------------------------------------------------------------
    def load_base(self, vocab_size: int | None) -> nn.Module:
        """The frozen base on this rank: whole, or with `reads_on_rank0_only` real on rank 0 and a meta-device
        skeleton of it elsewhere (a 4-bit base given rank 0's packed layout). Collective."""
        return self._load(vocab_size)

    def _load(self, vocab_size: int | None, placed_by_backend: bool = False) -> nn.Module:
        acc = self.acc
        model = load_base_model(
            self.cfg,
            acc.device,
            vocab_size=vocab_size,
            empty=self.reads_on_rank0_only and not acc.is_main_process,
            placed_by_backend=placed_by_backend,
        )
        if self.reads_on_rank0_only and self.cfg.method.name == "qlora":
            match_rank0_quantized_layout(model, acc.device)
        return model

    def _log_rank0_loading(self, log) -> None:
        log.info("rank 0 read the base; %d other rank(s) received only their shards", self.acc.num_processes - 1)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply this backend's parallelism to the model with its adapter attached (before the optimizer exists)."""
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(model, optimizer) ready to train: wrapped for gradient synchronisation, or a DeepSpeed engine."""
        return self.acc.prepare(model, optimizer)

    # ---- training step ----------------------------------------------------------------------------------------
    def micro_batch(self, model: nn.Module, k: int, n: int):
        """Context for micro-batch k of n in one optimizer step: gradients are synchronised on the last one only
        (accumulate() does that for DDP and marks the boundary for DeepSpeed)."""
        return self.acc.accumulate(model)

    def after_eval(self, model: nn.Module) -> None:
        """Put the model back into its training layout after forwards without backward."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float | None:
        """Clip the gradients to `max_norm` over all ranks; returns their norm before clipping, or None where the
        backend does not report one (DeepSpeed clips inside its engine). Collective."""
        norm = self.acc.clip_grad_norm_(model.parameters(), max_norm)
        return None if norm is None else self._scalar(norm)

    def _scalar(self, t: torch.Tensor) -> float:
        """The value of a scalar the backend may hold sharded (the gradient norm). Collective where it is."""
        return float(t)

    # ---- saving -----------------------------------------------------------------------------------------------
    @contextmanager
    def trainable_state_for_saving(self, model: nn.Module):
        """Context in which rank 0 can save the adapter: yields whole trainable tensors by name when the live ones
        are shards, else None (the live parameters are whole). Collective: every rank must enter it."""
        yield None

    def state_access(self, model: nn.Module, optimizer) -> StateAccess:
        """What checkpoints read and restore: the unwrapped model's trainable parameters and the optimizer state;
        `optimizer` is what `prepare` returned."""
        raise NotImplementedError

    # ---- sizes ------------------------------------------------------------------------------------------------
    def numel(self, p: nn.Parameter) -> int:
        """Elements of the whole parameter (a DTensor reports its global size)."""
        return p.numel()

    def local_numel(self, p: nn.Parameter) -> int:
        """Elements of the parameter this rank holds."""
        return p.numel()

    def parameter_counts(self, model: nn.Module) -> tuple[int, int]:
        """(trainable, all) parameters of the whole model."""
        params = list(model.parameters())
        return sum(self.numel(p) for p in params if p.requires_grad), sum(self.numel(p) for p in params)

    def frozen_bytes(self, model: nn.Module) -> tuple[int, int]:
        """(bytes of frozen parameters this rank holds, bytes of all frozen parameters)."""
        frozen = [p for p in model.parameters() if not p.requires_grad]
        return (sum(self.local_numel(p) * p.element_size() for p in frozen), sum(self.numel(p) * p.element_size() for p in frozen))


def build_backend(launch: LaunchSettings, accelerator, cfg: FtscaleConfig) -> Backend:
    """The backend the launch selected. Before the model is loaded: ZeRO-3 loading reads DeepSpeed's config."""
    if launch.backend == "fsdp2":
        from ftscale.distributed.fsdp import FSDP2Backend

        return FSDP2Backend(accelerator, cfg, launch.fsdp)
    if launch.backend == "deepspeed":
        from ftscale.distributed.zero import ZeroBackend

        return ZeroBackend(accelerator, cfg)
    from ftscale.distributed.ddp import DDPBackend

    return DDPBackend(accelerator, cfg)
