"""`auto` in the config: dtypes, precision and attention kernel chosen from the device the run is on, so that one
shipped config trains in bf16 with flash-attention on a GPU and in fp32 with sdpa on a CPU. Resolved once, before
anything is built; the resolved values are what config.yaml, checkpoints and QLoRA records hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import ValidationError
from transformers.utils import is_flash_attn_2_available

from ftscale.config import ConfigError, FtscaleConfig


@dataclass(frozen=True)
class DeviceCapabilities:
    cuda: bool
    bf16: bool  # the device computes in bfloat16 natively (Ampere and newer; not emulated)
    flash_attention: bool  # transformers finds a flash-attn 2 that imports and fits this device

    @classmethod
    def detect(cls) -> DeviceCapabilities:
        cuda = torch.cuda.is_available()
        return cls(cuda, cuda and torch.cuda.is_bf16_supported(including_emulation=False), cuda and is_flash_attn_2_available())


def resolve_auto(cfg: FtscaleConfig, device: DeviceCapabilities) -> tuple[FtscaleConfig, list[str]]:
    """(the config with every `auto` replaced, one "key=value" per choice that matters for this run)."""
    dtype, precision = ("bfloat16", "bf16") if device.bf16 else ("float32", "fp32")
    data, chosen = cfg.model_dump(), []

    def choose(key: str, value: str, shown: bool = True) -> str:
        *parents, leaf = key.split(".")
        section = data
        for name in parents:
            section = section[name]
        if section[leaf] == "auto":
            section[leaf] = value
            if shown:
                chosen.append(f"{key}={value}")
        return section[leaf]

    model_dtype = choose("model.dtype", dtype)
    choose("training.precision", precision)
    # Only QLoRA dequantises; other methods get a fixed value so that their checkpoints compare equal anywhere.
    qlora = cfg.method.name == "qlora"
    compute = choose("method.quantization.compute_dtype", dtype if qlora else "float32", shown=qlora)
    weights = compute if qlora else model_dtype
    # flash-attention computes in half precision only: fp32 weights stay on sdpa.
    flash = device.flash_attention and weights in ("bfloat16", "float16")
    choose("model.attn_implementation", "flash_attention_2" if flash else "sdpa")
    try:
        resolved = FtscaleConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ConfigError(f"with the auto settings for this device ({', '.join(chosen)}): {problems}") from None
    return resolved, chosen
