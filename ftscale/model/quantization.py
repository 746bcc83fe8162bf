"""The 4-bit base of QLoRA: how the recipe quantises it, the record of that written next to the adapter, and the
same quantisation replayed one tensor at a time, so a merge can start from the weights training actually saw."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from ftscale.config import FtscaleConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}
QUANT_TYPES = ("nf4", "fp4")
# ftscale_adapter.json's "quantization" keys: every setting that changes the dequantised values.
RECORD_KEYS = ("quant_type", "double_quant", "blocksize", "compute_dtype", "quant_storage", "tensors")


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
    parts = [p for p in module_name.removeprefix("base_model.model.").split(".") if p != "base_layer"]
    return ".".join([*parts, "weight"])


def quantization_record(model: nn.Module, cfg: FtscaleConfig) -> dict | None:
    """What a merge needs to replay the base's quantisation: the settings, the block size bitsandbytes used and
    the base tensors it quantised (by their names in the base checkpoint). None for a base that is not 4-bit."""
    if cfg.method.name != "qlora":
        return None
    import bitsandbytes as bnb

    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not layers:
        return None
    # Sharding backends may replace the weight by a plain tensor; bitsandbytes keeps the state on the module too.
    states = [getattr(m.weight, "quant_state", None) or m.quant_state for m in layers.values()]
    q = cfg.method.quantization
    return {
        "quant_type": q.quant_type,
        "double_quant": q.double_quant,
        "blocksize": states[0].blocksize,
        "compute_dtype": q.compute_dtype,
        "quant_storage": q.quant_storage,
        "tensors": sorted(_base_name(name) for name in layers),
    }


def dequantized(weight: torch.Tensor, record: dict) -> torch.Tensor:
    """`weight` as the trained model computed with it: cast to the compute dtype (as transformers loads it), quantised
    with the record's settings and dequantised. One tensor; bitsandbytes' own kernels, on the CPU here."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(
        weight.to(DTYPES[record["compute_dtype"]]).contiguous(),
        blocksize=record["blocksize"],
        compress_statistics=record["double_quant"],
        quant_type=record["quant_type"],
        quant_storage=DTYPES[record["quant_storage"]],
    )
    return dequantize_4bit(packed, state)
