"""The 4-bit base of QLoRA: how the recipe quantises it, the record of that written next to the adapter, and the
same quantisation replayed one tensor at a time, so a merge can start from the weights training actually saw."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from ftscale.config import FtscaleConfig

log = logging.getLogger("ftscale")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}
QUANT_TYPES = ("nf4", "fp4")
# The wrapper modules peft inserts between a model's module names and the layer holding the base weight.
PEFT_WRAPPERS = {"base_layer", "original_module"}


def quantization_config(cfg: FtscaleConfig) -> BitsAndBytesConfig | None:
    if cfg.method.name != "qlora":
        return None
    q = cfg.method.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=DTYPES[q.quant_storage],
    )


def _base_name(module_name: str) -> str:
    """A module's name inside the trained model -> the base checkpoint's name for its weight."""
    parts = [p for p in module_name.removeprefix("base_model.model.").split(".") if p not in PEFT_WRAPPERS]
    return ".".join([*parts, "weight"])


def quantization_record(model: nn.Module, cfg: FtscaleConfig) -> dict | None:
    """What a merge needs to replay the base's quantisation, read from the quantised layers themselves: type,
    double quantisation, block size, compute and storage dtypes, the base tensors quantised (by their names in the
    base checkpoint) and those stored transposed (GPT-2's Conv1D: transformers quantises the transpose). None for a
    base that is not 4-bit, or whose layers do not expose their quantisation state (then merge asks for it)."""
    if cfg.method.name != "qlora":
        return None
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # Sharding backends may replace the weight by a plain tensor; bitsandbytes keeps the state on the module too.
    states = {name: getattr(m.weight, "quant_state", None) or getattr(m, "quant_state", None) for name, m in layers.items()}
    if not layers or any(s is None for s in states.values()):
        log.warning("the 4-bit layers expose no quantisation state: the adapter records none (merge will ask for it)")
        return None
    first = next(iter(states.values()))
    return {
        "quant_type": first.quant_type,
        "double_quant": bool(first.nested),
        "blocksize": first.blocksize,
        "compute_dtype": cfg.method.quantization.compute_dtype,
        "quant_storage": cfg.method.quantization.quant_storage,
        "tensors": sorted(_base_name(name) for name in layers),
        "transposed": sorted(
            _base_name(name)
            for name, m in layers.items()
            if isinstance(getattr(m, "source_cls", None), type) and issubclass(m.source_cls, Conv1D)
        ),
    }


def dequantized(weight: torch.Tensor, record: dict, transposed: bool = False) -> torch.Tensor:
    """`weight` as the trained model computed with it: cast to the compute dtype (as transformers loads it), quantised
    with the record's settings and dequantised; `transposed` for a weight stored transposed (Conv1D), which
    transformers quantises as its transpose. One tensor; bitsandbytes' own kernels, on the CPU here."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = weight.to(DTYPES[record["compute_dtype"]])
    packed, state = quantize_4bit(
        (w.T if transposed else w).contiguous(),
        blocksize=record["blocksize"],
        compress_statistics=record["double_quant"],
        quant_type=record["quant_type"],
        quant_storage=DTYPES[record["quant_storage"]],
    )
    out = dequantize_4bit(packed, state)
    return out.T.contiguous() if transposed else out
