"""Load the tokenizer and the frozen base model a recipe names (4-bit NF4 for QLoRA)."""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ftscale.config import ConfigError, FtscaleConfig
from ftscale.config.model import DEFAULT_MODEL_PATH, ModelConfig
from ftscale.data import ensure_chat_template, ensure_pad_token
from ftscale.errors import first_line
from ftscale.model.bnb_cpu import disable_cpu_weight_repacking
from ftscale.model.quantization import DTYPES, quantization_config
from ftscale.safetensors_stream import read_header


def check_model_path(name: str, option: str = "model.path") -> None:
    """A model folder that cannot be loaded is a config error naming `option`, not a hub error or a traceback from
    deep inside transformers. A name like org/model is left to the hub where one is reachable."""
    path = Path(name)
    offline = is_offline_mode()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{option}={name}: the folder has no config.json, so it is not a Hugging Face model folder")
        for weights in sorted(path.glob("*.safetensors")):  # headers only: a truncated copy is named before loading
            read_header(weights)
        return
    looks_local = path.is_absolute() or name.startswith(".") or len(path.parts) > 2 or path.exists()
    if looks_local or offline:
        hint = " (the default model: run `make model` or `ftscale import-gguf`)" if name == DEFAULT_MODEL_PATH else ""
        raise ConfigError(f"{option}={name}: no such model folder{hint}")


def load_tokenizer(model_cfg: ModelConfig):
    """The model's tokenizer with a chat template (ChatML if it has none) and a pad token.
    Returns (tokenizer, number of tokens added to the vocabulary)."""
    check_model_path(model_cfg.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={model_cfg.path}: cannot load its tokenizer ({first_line(e)})") from None
    added = ensure_chat_template(tokenizer, model_cfg.chat_template)
    ensure_pad_token(tokenizer)
    return tokenizer, added


def load_base_model(
    cfg: FtscaleConfig, device: torch.device, vocab_size: int | None = None, empty: bool = False, placed_by_backend: bool = False
):
    """The frozen base model on `device`; embeddings resized to `vocab_size` when tokens were added.
    empty=True: the same model on the meta device, with no weight held (FSDP2 / ZeRO-3 ranks other than 0, which
    receive their shards from rank 0). A 4-bit base is then a skeleton: see ftscale.distributed.quantized_skeleton.
    placed_by_backend: the backend places (and partitions) the weights while they load (ZeRO-3's zero.Init)."""
    quant = quantization_config(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.path,
            dtype=DTYPES[cfg.model.dtype] if quant is None else DTYPES[cfg.method.quantization.compute_dtype],
            attn_implementation=cfg.model.attn_implementation,
            quantization_config=quant,
            # A backend that places the weights itself refuses a device_map.
            device_map={"": "meta"} if empty else {"": device} if quant is not None and not placed_by_backend else None,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except OSError as e:  # transformers' way of saying a weights file is missing or unreadable
        raise ConfigError(f"model.path={cfg.model.path}: cannot load the model ({first_line(e)})") from None
    if quant is None and not empty:
        model.to(device)
    if vocab_size is not None and vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    model.config.use_cache = False
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        disable_cpu_weight_repacking(model)

        # Casts the remaining non-quantised parameters (norms, embeddings) to fp32 for stable training.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    return model


def decoder_layers(model: nn.Module, use: str = "") -> list[nn.Module]:
    """The model's repeated blocks, which transformers names in `_no_split_modules`; `use` says what needs them,
    for the error where a model declares none."""
    names = next((set(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), set())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"{type(model).__name__} declares no decoder layer class (_no_split_modules){' that ' + use if use else ''}")
    return layers


def causal_lm(model: nn.Module) -> PreTrainedModel | None:
    """The transformers model inside whatever wraps it (peft, ftscale's bottleneck adapters), or None."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
