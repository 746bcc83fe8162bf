"""Model FLOPs of a PEFT training step and the peak they are divided by (perf/mfu). The formula is in
docs/dashboard.md; in short, per real token:

    4 * N_frozen      the frozen base: forward 2N, backward through the activations 2N, no weight gradients;
                      its output head only at labelled positions when the recipe computes it only there
  + 6 * N_trainable   the adapter: forward, activation gradients and its own weight gradients
  + 12 * L * d * c    attention of a token at causal context c (its position in its own example) in each of L
                      layers of query width d: QK^T and AV forward (4cd), twice that backward

N counts matmul weights (linear layers, the output head included) from their declared in/out features, so
4-bit and sharded parameters count at their logical size. Peer tools use 6 * N_total * T, which credits a frozen
base with weight gradients nobody computes; it is logged as perf/mfu_6n for comparison. Recomputation under
gradient checkpointing is not credited (it is hardware work, not model work)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ftscale.model.loading import causal_lm

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets; sparsity not counted; V100 has no bf16: its
# fp16 figure). Matched as whole words in torch.cuda.get_device_name(), most specific first.
PEAK_BF16 = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def table_peak(device_name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_name):
            return peak
    return None


@dataclass(frozen=True)
class ModelFlops:
    frozen: int  # matmul weights that do not train, the output head included
    trainable: int  # parameters that train (the adapter)
    layers: int
    attention_width: int  # query heads x head dim
    head: int = 0  # the output head's matmul weights (vocabulary x hidden)
    head_on_labels_only: bool = False  # training.head_on_labels_only: the head runs at labelled positions only

    def step(self, tokens: int, loss_tokens: int, attention_context: int, six_n: bool = False) -> float:
        """FLOPs of training on `tokens` real tokens, `loss_tokens` of them labelled, whose causal contexts sum to
        `attention_context`. `six_n`: as peer tools count them, 6 per parameter of the whole model at every token."""
        attention = 12.0 * self.layers * self.attention_width * attention_context
        if six_n:
            return 6.0 * (self.frozen + self.trainable) * tokens + attention
        head_tokens = loss_tokens if self.head_on_labels_only else tokens
        return (4.0 * (self.frozen - self.head) + 6.0 * self.trainable) * tokens + 4.0 * self.head * head_tokens + attention


def _matmul_size(module: torch.nn.Module) -> int | None:
    """in x out of a linear layer of any kind (torch, bitsandbytes 4/8-bit). peft's wrappers expose their base
    layer's features and weight too: the base layer is counted, not the wrapper."""
    if isinstance(module, BaseTunerLayer):
        return None
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(i, int) and isinstance(o, int) and isinstance(getattr(module, "weight", None), torch.Tensor):
        return i * o
    return None


def model_flops(model: torch.nn.Module, model_config, trainable: int, head_on_labels_only: bool = False) -> ModelFlops:
    """`trainable`: the adapter's parameter count (the backend's, which knows partitioned sizes). Frozen matmul
    sizes come from the layers' declared features, which sharding and 4-bit packing leave alone."""
    frozen = sum(n for m in model.modules() if (n := _matmul_size(m)) is not None and not m.weight.requires_grad)
    inner = causal_lm(model)
    head = (_matmul_size(inner.get_output_embeddings()) if inner is not None else None) or 0
    heads = getattr(model_config, "num_attention_heads", 0) or 0
    head_dim = getattr(model_config, "head_dim", None) or (getattr(model_config, "hidden_size", 0) // heads if heads else 0)
    return ModelFlops(frozen, trainable, getattr(model_config, "num_hidden_layers", 0) or 0, heads * head_dim, head, head_on_labels_only)


def measured_matmul_flops(seconds: float = 0.2, size: int = 1024) -> float:
    """FLOP/s of fp32 square matmuls on this process's CPU threads: the practical peak MFU is taken against on a
    CPU, which has no datasheet figure that holds across machines."""
    own = torch.Generator().manual_seed(0)  # never the global generator: a resumed run has just restored it
    a, b = torch.randn(size, size, generator=own), torch.randn(size, size, generator=own)
    a @ b  # warm-up: thread pool, allocator
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
        a @ b
        runs += 1
    return 2 * size**3 * runs / elapsed


def device_peak_flops(device: torch.device, override: float | None) -> tuple[float, str]:
    """(peak FLOP/s of this process's device, where the figure came from)."""
    if override is not None:
        return override, "logging.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if (peak := table_peak(name)) is not None:
            return peak, f"{name} bf16 datasheet"
        return measured_cuda_flops(device), f"{name}: measured bf16 matmul (not in the table; set logging.peak_flops)"
    return measured_matmul_flops(), "measured fp32 matmul"


def measured_cuda_flops(device: torch.device, size: int = 4096, runs: int = 20) -> float:
    own = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=own)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=own)
    a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(runs):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * runs / (time.perf_counter() - start)
