"""Work around bitsandbytes 0.50's in-place CPU weight repacking for 4-bit layers.

On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode without grad rewrites the packed weight and its
quant_state into a CPU kernel layout; `state_dict()` (which every adapter save calls) converts it back, and that
round trip is lossy: measured here, the frozen base's logits move by ~1.6e-3 after one save, and the eval path
differs from the training path by as much. A fine-tuning run needs one numeric path for training, evaluation,
saving and reloading, so the repack is switched off on the layers of models ftscale loads.
Remove when bitsandbytes makes the round trip exact (checked by tests/test_methods.py's QLoRA reload)."""

from torch import nn


def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Turn off the eval-time CPU repack on every 4-bit layer; returns how many layers were changed."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
