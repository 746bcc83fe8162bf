"""Read a peft adapter and describe, per base tensor, how merging changes it (LoRA, DoRA, IA3, replaced modules,
trainable token rows). Every edit works on fp32 values of one tensor."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftscale.config.method import PROMPT_METHOD_NAMES
from ftscale.errors import FtscaleError, first_line
from ftscale.json_files import read_json
from ftscale.methods.bottleneck import is_bottleneck_adapter
from ftscale.safetensors_stream import read_header, read_tensor

Edit = Callable[[torch.Tensor], torch.Tensor]
PREFIX = "base_model.model."
# peft_type of the prompt-learning methods -> their name: virtual tokens, no weight change to merge.
NOT_MERGEABLE = {method.upper(): name for method, name in PROMPT_METHOD_NAMES.items()}


class MergeError(FtscaleError, ValueError):
    """The adapter cannot be merged into this base; the message says why and what to do instead."""


@dataclass
class AdapterEdits:
    peft_type: str
    edits: dict[str, list[Edit]] = field(default_factory=lambda: defaultdict(list))  # base tensor name -> edits
    # base tensor name -> shape it must have (None in a dimension the adapter does not fix: IA3 scales one side)
    expected_shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    optional: set[str] = field(default_factory=set)  # edits that apply only where the base has the tensor (IA3 biases)
    min_rows: dict[str, int] = field(default_factory=dict)  # base tensor name -> rows it must have (token indices)
    # From ftscale_adapter.json: whether the base was 4-bit (None: no such file, another tool's adapter) and, for
    # QLoRA, how it was quantised (ftscale.model.quantization.quantization_record), unchecked until used.
    quantized_base: bool | None = None
    quantization: dict | None = None


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return bool(re.fullmatch(pattern, name))
    except re.error as e:
        raise MergeError(f"adapter_config.json: {pattern!r} is not a valid regular expression ({e})") from None


def _pattern_value(name: str, pattern, default):
    if not isinstance(pattern, dict):
        raise MergeError(f"adapter_config.json: patterns must map module names to values, got {pattern!r}")
    for key, value in pattern.items():
        if name == key or name.endswith("." + key) or _fullmatch(key, name):
            return value
    return default


def _load_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        infos, _ = read_header(st)
        return {name: read_tensor(info).float() for name, info in infos.items()}
    pt = adapter_dir / "adapter_model.bin"
    if pt.is_file():
        try:
            return {k: v.float() for k, v in torch.load(pt, map_location="cpu", weights_only=True).items()}
        except Exception as e:  # weights_only loading runs no code; any failure means a damaged or foreign file
            raise MergeError(f"{pt}: cannot be read ({first_line(e)}): the file is damaged or not an adapter") from None
    raise MergeError(f"{adapter_dir}: no adapter_model.safetensors (or adapter_model.bin)")


def _lora_edits(cfg: dict, tensors: dict[str, torch.Tensor], out: AdapterEdits) -> None:
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        m = re.match(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)$", key)
        if m:
            modules[m.group(1)][m.group(2)] = value
    fan_in_fan_out = cfg.get("fan_in_fan_out", False)
    for module, parts in modules.items():
        r = _pattern_value(module, cfg.get("rank_pattern") or {}, cfg["r"])
        alpha = _pattern_value(module, cfg.get("alpha_pattern") or {}, cfg["lora_alpha"])
        if not _positive_number(r) or not _positive_number(alpha):
            raise MergeError(f"adapter_config.json: rank {r!r} and lora_alpha {alpha!r} of {module} must be positive numbers")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        pair = ("lora_embedding_A", "lora_embedding_B") if "lora_embedding_A" in parts else ("lora_A.weight", "lora_B.weight")
        if not all(k in parts for k in pair):
            raise MergeError(f"adapter_model: {module} has only {', '.join(sorted(parts))}; LoRA needs both {pair[0]} and {pair[1]}")
        down, up = parts[pair[0]], parts[pair[1]]
        transpose = True if pair[0] == "lora_embedding_A" else fan_in_fan_out  # an embedding's delta is (B @ A)^T
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise MergeError(f"adapter_model: {module}'s {pair[1]} {tuple(up.shape)} and {pair[0]} {tuple(down.shape)} do not multiply")
        shape = (up.shape[0], down.shape[1])
        name = f"{module}.weight"
        out.expected_shapes[name] = shape[::-1] if transpose else shape

        # The delta is as large as the weight: compute it only when its tensor is merged, never all at once.
        def delta(a=down, b=up, s=scaling, t=transpose) -> torch.Tensor:
            d = b @ a * s
            return d.T if t else d

        magnitude = parts.get("lora_magnitude_vector")
        for extra in ("lora_magnitude_vector", "lora_B.bias"):  # one value per output feature
            if extra in parts and parts[extra].numel() != up.shape[0]:
                raise MergeError(f"adapter_model: {module}.{extra} has {parts[extra].numel()} values for {up.shape[0]} output features")
        if magnitude is None:
            out.edits[name].append(lambda w, d=delta: w + d())
        else:  # DoRA: rescale each output row of W + dW to the learned magnitude

            def dora(w, d=delta, m=magnitude):
                merged = w + d()
                rows = merged.T if fan_in_fan_out else merged
                factor = (m / torch.linalg.norm(rows, dim=1)).view(-1, 1)
                return (factor * rows).T if fan_in_fan_out else factor * rows

            out.edits[name].append(dora)
        if "lora_B.bias" in parts:
            out.edits[f"{module}.bias"].append(lambda b, d=parts["lora_B.bias"] * scaling: b + d)


def _ia3_edits(cfg: dict, tensors: dict[str, torch.Tensor], out: AdapterEdits) -> None:
    fan_in_fan_out = cfg.get("fan_in_fan_out", False)
    for key, scale in tensors.items():
        if not key.endswith(".ia3_l"):
            continue
        module = key.removesuffix(".ia3_l")
        # Feed-forward layers scale their input, ia3_l (1, in); others scale their output (and bias), ia3_l (out, 1).
        ff = cfg.get("feedforward_modules") or []
        if not (isinstance(ff, str) or (isinstance(ff, list) and all(isinstance(k, str) for k in ff))):
            raise MergeError(f"adapter_config.json: feedforward_modules must be a regex or a list of names, got {ff!r}")
        is_ff = _fullmatch(ff, module) if isinstance(ff, str) else any(module.endswith(str(k)) for k in ff)
        s = scale.T if fan_in_fan_out else scale
        if s.dim() != 2 or 1 not in s.shape:
            raise MergeError(f"adapter_model: {key} has shape {tuple(scale.shape)}, not an IA3 vector")
        # (out, 1) scales output rows, (1, in) input columns: the base weight must agree in that dimension.
        out.expected_shapes[f"{module}.weight"] = (s.shape[0], None) if s.shape[1] == 1 else (None, s.shape[1])
        out.edits[f"{module}.weight"].append(lambda w, s=s: w * s)
        if not is_ff:
            out.edits[f"{module}.bias"].append(lambda b, s=scale: b * s.reshape(b.shape))
            out.optional.add(f"{module}.bias")


def _full_tensor_edits(cfg: dict, tensors: dict[str, torch.Tensor], out: AdapterEdits) -> None:
    """modules_to_save (whole tensors replaced) and trainable token rows."""
    indices = cfg.get("trainable_token_indices")
    for key, value in tensors.items():
        if key.endswith(".token_adapter.trainable_tokens_delta"):
            module = key.removesuffix(".token_adapter.trainable_tokens_delta")
            idx = indices if isinstance(indices, list) else _pattern_value(module, indices or {}, None)
            if idx is None:
                raise MergeError(f"trainable tokens for {module} have no indices in adapter_config.json")
            if value.dim() != 2:
                raise MergeError(f"adapter_model: {key} has shape {tuple(value.shape)}, not (rows, embedding size)")
            if not (isinstance(idx, list) and all(type(i) is int and 0 <= i < 2**62 for i in idx) and len(idx) == value.shape[0]):
                raise MergeError(
                    f"adapter_config.json: trainable_token_indices for {module} must be {value.shape[0]} row numbers, got {idx!r}"
                )
            index = torch.tensor(idx)
            out.min_rows[f"{module}.weight"] = max(idx, default=-1) + 1
            out.expected_shapes[f"{module}.weight"] = (None, value.shape[1])
            out.edits[f"{module}.weight"].append(lambda w, i=index, v=value: w.index_copy(0, i, v))
        elif not re.search(r"\.(lora_\w+|ia3_l)(\.weight|\.bias)?$", key):
            # peft saves a targeted embedding's own weight as `<module>.base_layer.weight` (save_embedding_layers)
            name = key.replace(".base_layer.", ".")
            out.expected_shapes[name] = tuple(value.shape)
            out.edits[name].append(lambda _w, v=value: v)


REQUIRED_KEYS = {"LORA": ("r", "lora_alpha"), "IA3": ()}


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _read_adapter_config(path: Path) -> dict:
    cfg = read_json(path, MergeError, ": the adapter folder is damaged; export or save the adapter again")
    if not isinstance(cfg, dict):
        raise MergeError(f"{path}: must hold a JSON object")
    return cfg


def read_adapter_edits(adapter_dir: str | Path) -> AdapterEdits:
    adapter_dir = Path(adapter_dir)
    if is_bottleneck_adapter(adapter_dir):
        raise MergeError(
            f"{adapter_dir} holds bottleneck adapters, which add new layers rather than changing weights, so they "
            "cannot be merged. Serve them with the base: ftscale.methods.load_adapter(base_model, adapter_dir)."
        )
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise MergeError(f"{adapter_dir}: no adapter_config.json: not a peft adapter folder")
    cfg = _read_adapter_config(cfg_path)
    peft_type = cfg.get("peft_type", "")
    if not isinstance(peft_type, str):
        raise MergeError(f'{cfg_path}: peft_type must be a string such as "LORA", got {peft_type!r}')
    if peft_type in NOT_MERGEABLE:
        raise MergeError(
            f"{adapter_dir} is a {NOT_MERGEABLE[peft_type]} adapter: it learns virtual tokens fed with every input, not "
            "a weight change, so there is nothing to merge. Serve it as base + adapter: "
            "peft.PeftModel.from_pretrained(base_model, adapter_dir)."
        )
    if peft_type not in ("LORA", "IA3"):
        raise MergeError(f"{adapter_dir}: peft_type {peft_type!r} is not supported by the streaming merge (LORA, IA3 are)")
    missing = [k for k in REQUIRED_KEYS[peft_type] if k not in cfg]
    if missing:
        raise MergeError(f"{cfg_path}: no {', '.join(repr(k) for k in missing)}, which a {peft_type} adapter config must have")
    tensors = {k.removeprefix(PREFIX): v for k, v in _load_adapter_tensors(adapter_dir).items()}
    out = AdapterEdits(peft_type)
    _full_tensor_edits(cfg, tensors, out)  # replacements first: a delta then applies to the replaced tensor
    (_lora_edits if peft_type == "LORA" else _ia3_edits)(cfg, tensors, out)
    if not out.edits:
        raise MergeError(f"{adapter_dir}: the adapter holds no {peft_type} weights, so merging would change nothing")
    meta_path = adapter_dir / "ftscale_adapter.json"
    if meta_path.is_file():
        meta = _read_adapter_config(meta_path)
        out.quantized_base = meta.get("quantized_base", False) is True
        out.quantization = meta.get("quantization")  # checked where it is used (ftscale.merge.quantized_base)
    return out
