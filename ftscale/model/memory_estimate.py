"""What one process's training needs in memory, estimated from the model's config before it is loaded: it decides
`training.gradient_checkpointing: auto`, and bench/gpu_check.sh compares it with what CUDA measured.

The activation term counts the tensors a Llama-style decoder layer keeps for backward, per token; it is checked
against torch's saved-tensor hooks for LoRA (fp32, both dropouts, bf16 autocast) and DoRA (tests/test_performance.py).
QLoRA's 4-bit layers are not in that test (bitsandbytes' CPU path differs from CUDA's): bench/gpu_check.sh
compares its training peak on a GPU. Attention is taken as sdpa or flash-attention
(memory linear in the sequence). It is an estimate for one process holding the whole base: sharding backends need
less, so `auto` errs towards checkpointing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftscale.config import FtscaleConfig
from ftscale.distributed.launch import processes_on_this_node
from ftscale.errors import first_line

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BLOCK = 64  # weights per absmax in bitsandbytes' 4-bit formats


def four_bit_bytes_per_weight(double_quant: bool) -> float:
    """4 bits, plus an absmax per block of 64: fp32, or with double quantisation 8 bits and an fp32 per 256 blocks."""
    return 0.5 + (1 / BLOCK + 4 / (BLOCK * 256) if double_quant else 4 / BLOCK)


LORA_FAMILY = ("lora", "qlora", "dora")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEADROOM = 0.8  # `auto` checkpoints when the estimate passes this share of the memory a process has


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_width: int  # key/value heads x head size
    tied: bool

    @classmethod
    def read(cls, path: str | Path) -> ModelShape:
        """From the model folder's config.json (a config error naming model.path where there is none)."""
        from transformers import AutoConfig

        from ftscale.config import ConfigError
        from ftscale.model.loading import check_model_path

        check_model_path(str(path))
        try:
            return cls.of(AutoConfig.from_pretrained(path))
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"model.path={path}: its config cannot be read for the memory estimate ({first_line(e)})") from None

    @classmethod
    def of(cls, config) -> ModelShape:
        config = config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        # GPT-2 style configs name no intermediate size (n_inner: None means 4 x hidden).
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
        return cls(
            config.hidden_size,
            config.num_hidden_layers,
            intermediate,
            config.vocab_size,
            kv,
            bool(getattr(config, "tie_word_embeddings", False)),
        )

    def projection_sizes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class MemoryEstimate:
    base: int  # frozen weights as held (4-bit for QLoRA's projections)
    adapter: int  # trainable parameters, their gradients and AdamW's two moments, fp32
    activations: int  # what forward keeps for backward, one micro-batch
    logits: int  # the head's fp32 logits and their gradient at their largest

    @property
    def total(self) -> int:
        return self.base + self.adapter + self.activations + self.logits


def estimate_training_memory(shape: ModelShape, cfg: FtscaleConfig, checkpointing: bool, cuda: bool = False) -> MemoryEstimate:
    """For a config whose `auto` values are resolved, on a CUDA device or a CPU."""
    t, method = cfg.training, cfg.method
    tokens = t.micro_batch_size * cfg.data.max_seq_len
    act = BYTES["bfloat16"] if t.precision in ("bf16", "fp16") else BYTES[cfg.model.dtype]
    sizes = shape.projection_sizes()
    linear = shape.layers * sum(i * o for i, o in sizes.values())
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    norms = shape.hidden * (2 * shape.layers + 1)
    if method.name == "qlora":  # peft's k-bit preparation keeps the non-quantised parameters in fp32
        base = int(linear * four_bit_bytes_per_weight(method.quantization.double_quant)) + 4 * (embeddings + norms)
    else:
        base = BYTES[cfg.model.dtype] * (linear + embeddings + norms)
    adapter = 0
    if method.name in LORA_FAMILY:
        targets = PROJECTIONS if method.lora.target_modules == "all-linear" else method.lora.target_modules
        r = method.lora.r
        adapter = 16 * shape.layers * sum(r * (i + o) + (o if method.name == "dora" else 0) for n, (i, o) in sizes.items() if n in targets)
    # Kept per token by one layer (elements): each RMSNorm's input and output, the rotated q and k, v, the attention
    # output and its contiguous copy for o_proj; the MLP's gate, up, activation and product. Frozen projections keep
    # no input (their gradient needs only the weight); LoRA's A shares its layer's input. Half-precision runs keep
    # the norms' inputs in fp32 too. LoRA dropout keeps each projection's mask (bools on CUDA and from FastCPUDropout,
    # the input's dtype from torch's CPU dropout) and dropped inputs where projections shared one: about 3 x hidden.
    h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
    per_token = (7 * h + 2 * kv + 4 * i) * act + (2 * h * 4 if act < 4 else 0)
    if method.name in LORA_FAMILY and method.lora.dropout > 0:
        mask = 1 if cuda or (t.fast_cpu_dropout and not t.compile) else act  # compiled: torch's dropout
        per_token += 3 * h * act + (6 * h + i) * mask
    if method.name == "dora":  # each projection's base output and its rescaled copy, which the magnitude needs again
        per_token += 2 * (3 * h + 2 * kv + 2 * i) * act
    # With checkpointing each layer keeps its input, and one layer's full set exists again while it is recomputed.
    if t.activation_offloading:  # what the device holds: one layer's, until forward moves it to the host
        activations = tokens * per_token
    else:
        activations = tokens * (shape.layers * h * act + per_token if checkpointing else shape.layers * per_token)
    positions = min(tokens, t.loss_chunk_size or tokens) if t.head_on_labels_only else tokens
    logits = 3 * positions * shape.vocab * 4  # logits, their softmax and its gradient
    return MemoryEstimate(base, adapter, activations, logits)


def process_memory_bytes(cuda: bool) -> int:
    """Memory one process may use: its GPU's total, or on CPU the machine's memory shared by the processes started
    on this node. Totals, not what is free now: every rank must reach the same decision."""
    if cuda:
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    return total // processes_on_this_node()


def needs_checkpointing(shape: ModelShape, cfg: FtscaleConfig, memory: int, cuda: bool) -> tuple[bool, MemoryEstimate]:
    """Whether training without recomputation would pass HEADROOM of `memory`; and the estimate without it."""
    estimate = estimate_training_memory(shape, cfg, checkpointing=False, cuda=cuda)
    return estimate.total > HEADROOM * memory, estimate
