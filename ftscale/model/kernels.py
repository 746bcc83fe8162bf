"""Faster code for the loaded model's own computation: Liger's Triton kernels on CUDA (`model.liger_kernels`:
RMSNorm, RoPE and SwiGLU patched into the model, and its fused linear cross-entropy for the loss; imported only
where they are on, so CPU runs never import them), torch.compile of the decoder layers (`training.compile`), and
dropout masks drawn in bulk on CPU (`training.fast_cpu_dropout`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
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
        dropped = round(self.p * 65536)  # of 65536 lane values
        exact = 0 < dropped < 65536 and abs(dropped / 65536 - self.p) <= 0.01 * self.p
        if not self.training or self.inplace or x.device.type != "cpu" or not exact or torch.compiler.is_compiling():
            return super().forward(x)
        n = x.numel()
        draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits random
        drop = draws.view(torch.int16)[:n].view(x.shape) < dropped - 32768  # P(drop) = dropped / 65536
        return _DropAndScale.apply(x, drop, 65536 / (65536 - dropped))


class _DropAndScale(torch.autograd.Function):
    """x with the `drop` positions zeroed, times `scale`; the same in backward. By hand because x * mask with a bool
    mask converts the mask to x's dtype in forward and again in backward: twice as slow on wide layers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0).mul_(ctx.scale), None, None


def use_fast_cpu_dropout(model: nn.Module) -> int:
    """Make every nn.Dropout of the model (the base's and the adapter's) a FastCPUDropout; returns how many. The
    class is swapped in place: the modules keep their places and hold no state, so state dicts are unchanged."""
    swapped = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    for module in swapped:
        module.__class__ = FastCPUDropout
    return len(swapped)
