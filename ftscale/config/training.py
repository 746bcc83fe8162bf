"""`training:` the optimisation loop."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ftscale.config.base import Section

Beta = Annotated[float, Field(ge=0, lt=1)]


class TrainingConfig(Section):
    output_dir: str = Field("runs/default", description="Where adapters, checkpoints and logs of this run go.")
    seed: int = Field(42, description="Seed for initialisation, dropout and data order.")
    epochs: int = Field(1, gt=0, description="Passes over the training data (max_steps, when set, wins).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(1, gt=0, description="Rows per forward pass per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    adam_betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto", description="AdamW kernel: auto picks fused where the device supports it, else foreach."
    )
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: float = Field(0, ge=0, description="Warmup length: steps if >= 1, a fraction of the total steps if < 1.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (null disables).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision of forward/backward; auto: bf16 where the device computes in it, else fp32."
    )
    head_on_labels_only: bool = Field(
        True,
        description="Apply the output head and the loss only at positions with a label (not for prompt methods); same loss, less compute.",
    )
    loss_chunk_size: int | None = Field(
        1024,
        gt=0,
        description="Labelled positions per chunk of the head and cross-entropy, so the logits never exist whole (null: one piece).",
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward to save memory; auto: when the memory estimate passes 80% of what a process has.",
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer; the first steps pay the compile time (measured in bench/RESULTS.md)."
    )
    activation_offloading: bool = Field(
        False,
        description="Keep what forward saves for backward in host memory, not the GPU's (CUDA only; slower: for activations too big).",
    )
    fast_cpu_dropout: bool = Field(
        True, description="On CPU, draw dropout masks four at a time (faster; other masks than torch's); false: torch's nn.Dropout."
    )
    fused_cpu_lora: bool = Field(
        True, description="On CPU, LoRA layers add B(A(x)) into the base output inside one matmul (addmm); false: peft's own forward."
    )
    reuse_host_memory: bool = Field(
        True,
        description="One process on CPU: glibc keeps freed memory for the next step, not page-faulting it in afresh (about 5% faster).",
    )
    log_every: int = Field(1, gt=0, description="Optimizer steps between console/W&B log lines.")
    eval_every: int | None = Field(None, gt=0, description="Optimizer steps between held-out evaluations (null: only at start and end).")
    eval_generate_examples: int = Field(
        0, ge=0, description="Held-out examples answered greedily at each evaluation and scored by exact match (0: off)."
    )
    eval_generate_max_tokens: int = Field(64, gt=0, description="Most new tokens per answer in the exact-match evaluation.")

    @model_validator(mode="after")
    def _warmup_fraction(self):
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ValueError("training.warmup_steps must be a whole number of steps (>= 1) or a fraction below 1")
        return self
