"""Liger's Triton kernels on CUDA (`model.liger_kernels`): RMSNorm, RoPE and SwiGLU patched into the loaded model,
and its fused linear cross-entropy for the loss. Imported only where they are on, so CPU runs never import them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def apply_liger_kernels(model: nn.Module) -> Callable:
    """Patch the base model's norms, rotary embedding and MLPs in place (before adapters are attached: the patched
    MLP calls its projections, LoRA-wrapped or not); returns Liger's fused linear cross-entropy. The model's forward
    is left as it is: ftscale computes the loss itself (ftscale.training.loss)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    kernels = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}
    _apply_liger_kernel_to_instance(model=model, **kernels)
    return liger_fused_linear_cross_entropy
