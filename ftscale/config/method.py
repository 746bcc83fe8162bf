"""`method:` which parameter-efficient method trains, and its hyper-parameters."""

from typing import Literal

from pydantic import Field, model_validator

from ftscale.config.base import Section
from ftscale.config.model import DType

MethodName = Literal["lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "bottleneck"]

# Methods whose trainable state is a set of virtual tokens fed with every example (peft's prompt learning): no
# packing, no gradient checkpointing, nothing to merge, and read on every FSDP2 rank.
PROMPT_METHOD_NAMES = {"prompt_tuning": "prompt tuning", "prefix_tuning": "prefix tuning", "p_tuning": "P-tuning"}
PROMPT_METHODS = tuple(PROMPT_METHOD_NAMES)


class LoraSection(Section):
    r: int = Field(8, gt=0, description="LoRA rank; higher increases capacity and memory.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: the delta is (alpha / r) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear (every linear layer except the output head)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.")


BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # the 4-bit block sizes bitsandbytes quantises with on every device


class QuantizationSection(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base (QLoRA uses NF4).")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bit per weight).")
    compute_dtype: DType | Literal["auto"] = Field(
        "auto",
        description="dtype the 4-bit weights are dequantised to for matmuls; auto: bfloat16 where the device has it, else float32.",
    )
    quant_storage: DType | Literal["uint8"] = Field(
        "uint8", description="Storage dtype of packed 4-bit weights (FSDP2 and ZeRO-3 shard uint8 as it is; FSDP1 needed the model dtype)."
    )


class IA3Section(Section):
    target_modules: list[str] = Field(["k_proj", "v_proj", "down_proj"], description="Modules whose activations IA3 rescales.")
    feedforward_modules: list[str] = Field(
        ["down_proj"], description="Subset of target_modules that are feed-forward (scaled on their input)."
    )


class PromptSection(Section):
    num_virtual_tokens: int = Field(16, gt=0, description="Virtual tokens (prompt, prefix or P-tuning) per example.")
    init_text: str | None = Field(None, description="prompt_tuning only: initialise the virtual tokens from this text.")
    prefix_projection: bool = Field(False, description="prefix_tuning only: reparameterise the prefix through an MLP.")
    encoder_hidden_size: int = Field(128, gt=0, description="p_tuning / prefix projection: hidden size of the prompt encoder.")


class BottleneckSection(Section):
    reduction_factor: int = Field(16, gt=0, description="Bottleneck width = hidden_size / reduction_factor.")
    activation: Literal["gelu", "relu", "silu", "tanh"] = Field("gelu", description="Non-linearity between down and up projection.")
    placement: list[Literal["attention", "mlp"]] = Field(
        ["attention", "mlp"], description="Houlsby places an adapter after attention and after the MLP of every layer."
    )


class MethodConfig(Section):
    name: MethodName = Field("lora", description="The PEFT method: " + ", ".join(MethodName.__args__) + ".")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA / QLoRA / DoRA settings.")
    quantization: QuantizationSection = Field(default_factory=QuantizationSection, description="QLoRA 4-bit base settings.")
    ia3: IA3Section = Field(default_factory=IA3Section, description="IA3 settings.")
    prompt: PromptSection = Field(default_factory=PromptSection, description="Prompt / prefix / P-tuning settings.")
    bottleneck: BottleneckSection = Field(default_factory=BottleneckSection, description="Houlsby bottleneck adapter settings.")

    @model_validator(mode="after")
    def _ia3_feedforward_subset(self):
        extra = set(self.ia3.feedforward_modules) - set(self.ia3.target_modules)
        if extra:
            raise ValueError(f"method.ia3.feedforward_modules {sorted(extra)} must also be listed in method.ia3.target_modules")
        return self
