"""`auto` in the config: dtypes, precision, attention kernel, Liger kernels and gradient checkpointing chosen from
the device the run is on, so that one shipped config trains in bf16 with flash-attention on a GPU and in fp32 with
sdpa on a CPU. Resolved once, before anything is built; the resolved values are what config.yaml, checkpoints and
QLoRA records hold."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from transformers.utils import is_flash_attn_2_available

from ftscale.config import PROMPT_METHODS, ConfigError, FtscaleConfig
from ftscale.model.memory_estimate import ModelShape, needs_checkpointing, process_memory_bytes


@dataclass(frozen=True)
class DeviceCapabilities:
    cuda: bool
    bf16: bool  # the device computes in bfloat16 natively (Ampere and newer; not emulated)
    flash_attention: bool  # transformers finds a flash-attn 2 that imports and fits this device
    liger: bool = False  # liger-kernel is installed and the device runs its Triton kernels (CUDA)
    memory: int = 0  # bytes one process may use (its GPU's, or its share of the host's memory)

    @classmethod
    def detect(cls) -> DeviceCapabilities:
        cuda = torch.cuda.is_available()
        return cls(
            cuda,
            cuda and torch.cuda.is_bf16_supported(including_emulation=False),
            cuda and is_flash_attn_2_available(),
            cuda and importlib.util.find_spec("liger_kernel") is not None,
            process_memory_bytes(cuda),
        )


def resolve_auto(cfg: FtscaleConfig, device: DeviceCapabilities, shape: ModelShape | None = None) -> tuple[FtscaleConfig, list[str]]:
    """(the config with every `auto` replaced, one "key=value" per choice that matters for this run). `shape` is
    the model's, read from model.path where gradient checkpointing is `auto` and it is not given."""
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
                chosen.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
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
    if choose("model.liger_kernels", device.liger, shown=device.cuda) is True and not device.liger:
        raise ConfigError(
            "model.liger_kernels=true needs a CUDA device and liger-kernel installed (pip install 'ftscale[cuda]'); set it to auto or false"
        )
    if cfg.training.activation_offloading and not device.cuda:
        raise ConfigError(
            "training.activation_offloading=true moves activations from GPU memory to the host, and this machine has no "
            "CUDA device: set it to false"
        )
    autocast = data["training"]["precision"] in ("bf16", "fp16")
    if cfg.training.activation_offloading and autocast and model_dtype == "float32" and not qlora:
        raise ConfigError(
            f"training.activation_offloading=true with model.dtype=float32 under training.precision="
            f"{data['training']['precision']}: autocast casts each frozen weight afresh, and offloading would move "
            "every copy to the host and back; set model.dtype=auto or bfloat16"
        )
    # Decided from the memory estimate of the resolved config, so it is chosen last.
    checkpointing = data["training"]["gradient_checkpointing"] == "auto"
    if checkpointing:
        data["training"]["gradient_checkpointing"] = False
    resolved = _validated(data, chosen)
    if checkpointing and cfg.method.name not in PROMPT_METHODS:  # peft cannot checkpoint prompt methods
        needed, estimate = needs_checkpointing(shape or ModelShape.read(cfg.model.path), resolved, device.memory, device.cuda)
        data["training"]["gradient_checkpointing"] = needed
        chosen.append(f"training.gradient_checkpointing={str(needed).lower()} (estimate {estimate.total / 1e9:.2f} GB)")
        resolved = _validated(data, chosen)
    return resolved, chosen


def _validated(data: dict, chosen: list[str]) -> FtscaleConfig:
    try:
        return FtscaleConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ConfigError(f"with the auto settings for this device ({', '.join(chosen)}): {problems}") from None
