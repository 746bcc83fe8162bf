"""`model:` which base model to load and how."""

from typing import Literal

from pydantic import Field

from ftscale.config.base import Section

DType = Literal["float32", "bfloat16", "float16"]
DEFAULT_MODEL_PATH = ".cache/ftscale/models/SmolLM2-135M-Instruct"  # what `ftscale import-gguf` writes


class ModelConfig(Section):
    path: str = Field(
        DEFAULT_MODEL_PATH,
        description="Hugging Face model folder (or hub name where a hub is reachable); `ftscale import-gguf` makes the default.",
    )
    dtype: DType | Literal["auto"] = Field(
        "auto",
        description="dtype of the frozen base weights (not the 4-bit QLoRA base); auto: bfloat16 where the device has it, else float32.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel (packed rows use its varlen path); auto: flash_attention_2 on CUDA with flash-attn, else sdpa.",
    )
    liger_kernels: bool | Literal["auto"] = Field(
        "auto",
        description="Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on CUDA; auto: where liger-kernel is installed.",
    )
    chat_template: Literal["auto", "tokenizer", "chatml"] = Field(
        "auto", description="auto: the tokenizer's template, or ChatML when it has none; chatml: always ChatML."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder (only for models you trust).")
