"""peft configs for the methods peft implements: LoRA, QLoRA, DoRA, IA3, prompt, prefix and P-tuning."""

from __future__ import annotations

from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
)

from ftscale.config.method import MethodConfig


def peft_config(method: MethodConfig, model_path: str) -> PeftConfig:
    """The peft config for `method.name` (every method but bottleneck)."""
    name, task = method.name, TaskType.CAUSAL_LM
    if name in ("lora", "qlora", "dora"):
        lora = method.lora
        return LoraConfig(
            task_type=task,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_rslora=lora.use_rslora,
            use_dora=name == "dora",
        )
    if name == "ia3":
        return IA3Config(task_type=task, target_modules=method.ia3.target_modules, feedforward_modules=method.ia3.feedforward_modules)
    prompt = method.prompt
    if name == "prompt_tuning":
        if prompt.init_text:
            return PromptTuningConfig(
                task_type=task,
                num_virtual_tokens=prompt.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=prompt.init_text,
                tokenizer_name_or_path=model_path,
            )
        return PromptTuningConfig(task_type=task, num_virtual_tokens=prompt.num_virtual_tokens)
    if name == "prefix_tuning":
        return PrefixTuningConfig(
            task_type=task,
            num_virtual_tokens=prompt.num_virtual_tokens,
            prefix_projection=prompt.prefix_projection,
            encoder_hidden_size=prompt.encoder_hidden_size,
        )
    if name == "p_tuning":
        return PromptEncoderConfig(
            task_type=task, num_virtual_tokens=prompt.num_virtual_tokens, encoder_hidden_size=prompt.encoder_hidden_size
        )
    raise ValueError(f"method {name!r} is not a peft method")
