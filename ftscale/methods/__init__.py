"""Attach, save and load the trainable part of every method behind one interface."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ftscale.config import FtscaleConfig
from ftscale.methods.bottleneck import (
    BottleneckModel,
    is_bottleneck_adapter,
    load_bottleneck,
)
from ftscale.methods.peft_methods import peft_config
from ftscale.model.quantization import quantization_record


def attach_adapter(model: nn.Module, cfg: FtscaleConfig) -> nn.Module:
    """Freeze `model` and add the trainable parameters of `cfg.method`."""
    if cfg.method.name == "bottleneck":
        return BottleneckModel(model, cfg.method.bottleneck)
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg.method, cfg.model.path))


def save_adapter_config(model: nn.Module, out_dir: str | Path, cfg: FtscaleConfig) -> None:
    """The adapter's config without its weights (peft's adapter_config.json or bottleneck_config.json), plus
    `ftscale_adapter.json` recording the method, whether the base was quantised and, for QLoRA, how (the merge
    replays that quantisation to merge into the weights training saw)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, BottleneckModel):
        model.save_config(out)
    else:
        model.peft_config["default"].save_pretrained(str(out))
    meta = {"method": cfg.method.name, "base_model": cfg.model.path, "quantized_base": cfg.method.name == "qlora"}
    record = quantization_record(model, cfg)
    if record is not None:
        meta["quantization"] = record
    (out / "ftscale_adapter.json").write_text(json.dumps(meta, indent=2))


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: FtscaleConfig, state_dict: dict | None = None) -> None:
    """Write only the adapter: peft's own format for peft methods (so `PeftModel.from_pretrained` loads it).
    `state_dict`: whole trainable tensors by parameter name, when the live ones are shards (FSDP2)."""
    model.save_pretrained(str(out_dir), state_dict=state_dict)
    save_adapter_config(model, out_dir, cfg)


def check_saved_adapter(out_dir: str | Path, trainable_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse an adapter file with no tensors or empty ones (a known failure of other tools under ZeRO-3:
    40-byte adapter files, shape-[0] tensors). `trainable_shapes` are the live shapes, taken while gathered."""
    from safetensors import safe_open

    path = Path(out_dir) / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    empty = [k for k, shape in {**shapes, **trainable_shapes}.items() if 0 in shape]
    if not shapes or empty:
        raise RuntimeError(
            f"{path}: the adapter is empty or has empty tensors ({empty[:3] or 'no tensors'}): it was not gathered before saving"
        )


def load_adapter(base: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> nn.Module:
    if is_bottleneck_adapter(adapter_dir):
        return load_bottleneck(base, adapter_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
