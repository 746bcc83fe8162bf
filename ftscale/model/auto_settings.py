"""`auto` in the config: dtypes, precision and attention kernel chosen from the device the run is on, so that one
shipped config trains in bf16 with flash-attention on a GPU and in fp32 with sdpa on a CPU. Resolved once, before
anything is built; the resolved values are what config.yaml, checkpoints and QLoRA records hold."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ftscale.config import FtscaleConfig


@dataclass(frozen=True)
class DeviceCapabilities:
    cuda: bool
    bf16: bool  # the device computes in bfloat16 natively (Ampere and newer)
    flash_attention: bool  # the flash-attn package is installed, for a CUDA device

    @classmethod
    def detect(cls) -> DeviceCapabilities:
        cuda = torch.cuda.is_available()
        return cls(cuda, cuda and torch.cuda.is_bf16_supported(), cuda and importlib.util.find_spec("flash_attn") is not None)


def resolve_auto(cfg: FtscaleConfig, device: DeviceCapabilities) -> tuple[FtscaleConfig, list[str]]:
    """(the config with every `auto` replaced, one "key=value" per choice made)."""
    half = "bfloat16" if device.bf16 else "float32"
    choices = {
        "model.dtype": half,
        "training.precision": "bf16" if device.bf16 else "fp32",
        "method.quantization.compute_dtype": half,
        "model.attn_implementation": "flash_attention_2" if device.flash_attention else "sdpa",
    }
    data, chosen = cfg.model_dump(), []
    for key, value in choices.items():
        *parents, leaf = key.split(".")
        section = data
        for p in parents:
            section = section[p]
        if section[leaf] == "auto":
            section[leaf] = value
            chosen.append(f"{key}={value}")
    return FtscaleConfig.model_validate(data), chosen
