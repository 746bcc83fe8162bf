"""Faster code for the loaded model's own computation: Liger's Triton kernels on CUDA (`model.liger_kernels`:
RMSNorm, RoPE and SwiGLU patched into the model, and its fused linear cross-entropy for the loss; imported only
where they are on, so CPU runs never import them), torch.compile of the decoder layers (`training.compile`),
dropout masks drawn in bulk on CPU (`training.fast_cpu_dropout`) and LoRA's product added into the base output by
one matmul on CPU (`training.fused_cpu_lora`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from ftscale.model.loading import decoder_layers

log = logging.getLogger("ftscale")


def apply_liger_kernels(model: nn.Module) -> Callable | None:
    """Patch the base model's norms, rotary embedding and MLPs in place (before adapters are attached: the patched
    MLP calls its projections, LoRA-wrapped or not); returns Liger's fused linear cross-entropy, or None (logged)
    for a model type Liger has no kernels for. The model's forward is left as it is: ftscale computes the loss
    itself (ftscale.training.loss)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.warning("model.liger_kernels: Liger has no kernels for model type %s; training without them", model_type)
        return None

    kernels = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}
    _apply_liger_kernel_to_instance(model=model, **kernels)
    return liger_fused_linear_cross_entropy


def compile_decoder_layers(model: nn.Module) -> int:
    """torch.compile each decoder layer in place (`Module.compile`: parameter names do not change, so checkpoints
    and adapters are the same), with dynamic shapes since rows vary in length. Per layer, not the whole model, as
    torchtune and torchtitan do: one small graph compiled once serves every layer. Returns the layers compiled."""
    layers = decoder_layers(model, "training.compile compiles")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


class FastCPUDropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from 16-bit lanes of 64-bit random draws. Written by hand because torch draws
    one Mersenne-Twister number per element on CPU (bernoulli_, about 80M elements/s on a 2-core machine), which
    made dropout 18% of a LoRA step at the seed notebook's settings (a dropout before each of 7 adapters a layer);
    four lanes per draw make the mask cheaper (bench/RESULTS.md), and it is kept as bools where torch's CPU dropout
    keeps floats. p is rounded to a multiple of 2^-16 (torch's own dropout where that moves it by over 1%). The
    draws come from torch's global generator, so the seed, a checkpoint's RNG state and gradient checkpointing's
    recomputation reproduce the masks; they are other masks than torch's dropout draws from the same seed. Off CPU
    (CUDA draws Philox numbers in a fused kernel), in eval mode, in place and under torch.compile (which cannot
    trace random_ and would break each layer's graph there): torch's own dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, scale = self.unscaled(x)
        return kept if scale == 1.0 else kept.mul_(scale)  # in place: _Drop keeps only the mask for backward

    def unscaled(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """x with the dropped elements set to 0, and the scale the kept ones still need (1.0 where torch's dropout
        ran), for a caller that applies it to a smaller tensor: FusedCPULoraLinear scales LoRA's rank-r product."""
        dropped = round(self.p * 65536)  # of 65536 lane values
        exact = 0 < dropped < 65536 and abs(dropped / 65536 - self.p) <= 0.01 * self.p
        if not self.training or self.inplace or x.device.type != "cpu" or not exact or torch.compiler.is_compiling():
            return super().forward(x), 1.0
        n = x.numel()
        draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits random
        drop = draws.view(torch.int16)[:n].view(x.shape) < dropped - 32768  # P(drop) = dropped / 65536
        return _Drop.apply(x, drop), 65536 / (65536 - dropped)


class _Drop(torch.autograd.Function):
    """x with the `drop` positions set to 0; the same for the gradient. By hand because x * mask with a bool mask
    converts the mask to x's dtype in forward and again in backward (twice as slow on wide layers), and
    masked_fill copies x before filling; torch.where writes the result in one pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(drop)
        return torch.where(drop, 0.0, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (drop,) = ctx.saved_tensors
        return torch.where(drop, 0.0, grad), None


def use_fast_cpu_dropout(model: nn.Module) -> int:
    """Make every nn.Dropout of the model (the base's and the adapter's) a FastCPUDropout; returns how many. The
    class is swapped in place: the modules keep their places and hold no state, so state dicts are unchanged."""
    swapped = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    for module in swapped:
        module.__class__ = FastCPUDropout
    return len(swapped)


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module could do more than its forward: hooks of its own (a backend that partitions
    weights may gather one in a hook) or global ones."""
    own = (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks)
    hooks = torch.nn.modules.module
    every = (hooks._global_forward_pre_hooks, hooks._global_forward_hooks, hooks._global_backward_pre_hooks, hooks._global_backward_hooks)
    return any(own) or any(every)


class FusedCPULoraLinear(LoraLinear):
    """peft's LoRA Linear with a faster forward on CPU for the plain case (one active adapter, no DoRA, not merged):
    `base(x) + B(A(dropout(x))) * scaling` becomes `base(x).addmm_(A(x with dropped elements at 0) * scale, B.T)`.
    Written by hand because peft's forward makes two more passes over the layer's full-width output (the scaling and
    the add, and the scaling again in backward) that the matmul can do while it writes: 11-18% of a CPU step
    (bench/fused_lora.py, bench/RESULTS.md). Dropout's scale is applied to the rank-r product with the scaling.
    Anything else (adapters disabled or merged, several active, variants, extra arguments, mixed dtypes, autocast, a
    base layer that is not a plain nn.Linear, a lora_B with a bias, hooks on the base, lora_B or dropout, or global
    ones: a backend may gather a weight in one) runs peft's own forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._plain_adapter(x) if not (args or kwargs) else None
        if name is None:
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        rows = x.reshape(-1, x.shape[-1])  # 2-D, so the in-place addmm_ acts on the output itself, not on a view
        kept, scale = dropout.unscaled(rows) if isinstance(dropout, FastCPUDropout) else (dropout(rows), 1.0)
        product = lora_a(kept) * (scale * self.scaling[name])
        result = self.base_layer(rows)
        # In place: the base layer's backward does not read its output, and no hook has seen it (_plain_adapter).
        result.addmm_(product, lora_b.weight.t())
        return result.view(*x.shape[:-1], result.shape[-1])

    def _plain_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter, where the fast path computes what peft's forward does; else None."""
        if x.device.type != "cpu" or self.disable_adapters or self.merged or torch.is_autocast_enabled("cpu"):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        lora_a, lora_b, base, dropout = self.lora_A[active[0]], self.lora_B[active[0]], self.base_layer, self.lora_dropout[active[0]]
        plain = (
            type(base) is nn.Linear and type(lora_b) is nn.Linear and lora_b.bias is None and not any(map(_hooked, (base, lora_b, dropout)))
        )
        return active[0] if plain and x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype else None


def use_fused_cpu_lora(model: nn.Module) -> int:
    """Make every LoRA Linear of the model a FusedCPULoraLinear; returns how many. The class is swapped in place, as
    for the dropout: state dicts, adapter files and peft's other methods are unchanged."""
    swapped = [m for m in model.modules() if type(m) is LoraLinear]
    for module in swapped:
        module.__class__ = FusedCPULoraLinear
    return len(swapped)
