"""Faster code for the loaded model's own computation: Liger's Triton kernels on CUDA (`model.liger_kernels`:
RMSNorm, RoPE and SwiGLU patched into the model, and its fused linear cross-entropy for the loss; imported only
where they are on, so CPU runs never import them), and torch.compile of the decoder layers (`training.compile`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

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
