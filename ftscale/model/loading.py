"""Load the tokenizer and the frozen base model a recipe names (4-bit NF4 for QLoRA)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.integrations import is_deepspeed_zero3_enabled

from ftscale.config import FtscaleConfig
from ftscale.config.model import ModelConfig
from ftscale.data import ensure_chat_template
from ftscale.model.bnb_cpu import disable_cpu_weight_repacking

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def load_tokenizer(model_cfg: ModelConfig):
    """The model's tokenizer with a chat template (ChatML if it has none) and a pad token.
    Returns (tokenizer, number of tokens added to the vocabulary)."""
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    added = ensure_chat_template(tokenizer, model_cfg.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, added


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


def load_base_model(cfg: FtscaleConfig, device: torch.device, vocab_size: int | None = None, empty: bool = False):
    """The frozen base model on `device`; embeddings resized to `vocab_size` when tokens were added.
    empty=True: the architecture only, on the meta device, no weights read (FSDP2 ranks other than 0 receive their
    shards from rank 0); not for QLoRA, whose weights are quantised while they are read."""
    quant = quantization_config(cfg)
    if empty:
        if quant is not None:
            raise ValueError("a 4-bit base cannot be created empty: its weights are quantised while they are read")
        config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[cfg.model.dtype], attn_implementation=cfg.model.attn_implementation,
                trust_remote_code=cfg.model.trust_remote_code,
            )
        return _finish(model, cfg, vocab_size)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.path,
        dtype=DTYPES[cfg.model.dtype] if quant is None else DTYPES[cfg.method.quantization.compute_dtype],
        attn_implementation=cfg.model.attn_implementation,
        quantization_config=quant,
        # ZeRO-3 places (and partitions) the weights itself and refuses a device_map.
        device_map={"": device} if quant is not None and not is_deepspeed_zero3_enabled() else None,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if quant is None:
        model.to(device)
    return _finish(model, cfg, vocab_size)


def _finish(model, cfg: FtscaleConfig, vocab_size: int | None):
    if vocab_size is not None and vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    model.config.use_cache = False
    if cfg.method.name == "qlora":
        from peft import prepare_model_for_kbit_training

        disable_cpu_weight_repacking(model)

        # Casts the remaining non-quantised parameters (norms, embeddings) to fp32 for stable training.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    return model
