"""Check a merged model against base + adapter: the automated form of "merged weight == W + alpha/r * B @ A".

For QLoRA adapters it also measures the choice of base weights: the trained model (4-bit base + adapter, the model
training evaluated) against the merge into the original weights and the merge into the dequantised ones."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from ftscale.data import ensure_pad_token
from ftscale.merge.adapter_edits import read_adapter_edits
from ftscale.merge.quantized_base import BASE_WEIGHTS, choose_base_weights, quantized_tensors
from ftscale.methods import load_adapter
from ftscale.model.bnb_cpu import disable_cpu_weight_repacking
from ftscale.model.quantization import DTYPES, dequantized

PROMPTS = ["The capital of Germany is", "Write a haiku about the sea.", "def fibonacci(n):"]


def _unmerged(base: Path, adapter: Path, record: dict | None) -> torch.nn.Module:
    """base + adapter in fp32, unmerged; with `record`, the quantised tensors replaced by their dequantised values
    first (the merge into the dequantised weights, computed without merging)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if record is not None:
        state = model.state_dict()
        with torch.no_grad():
            for name in quantized_tensors(record, {n: tuple(t.shape) for n, t in state.items()}):
                state[name].copy_(dequantized(state[name], record))
    return load_adapter(model, adapter).eval()


def trained_model(base: Path, adapter: Path, record: dict) -> torch.nn.Module:
    """The model training computed with: the base quantised to 4 bits with the run's settings, plus the adapter."""
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=record["quant_type"],
        bnb_4bit_use_double_quant=record["double_quant"],
        bnb_4bit_compute_dtype=DTYPES[record["compute_dtype"]],
        bnb_4bit_quant_storage=DTYPES[record["quant_storage"]],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=DTYPES[record["compute_dtype"]], quantization_config=quant, device_map={"": device}
    )
    disable_cpu_weight_repacking(model)
    return load_adapter(model, adapter).eval()


@torch.no_grad()
def _logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=tokenizer(p, return_tensors="pt")["input_ids"].to(device)).logits.float().cpu() for p in prompts]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@torch.no_grad()
def verify_merge(
    base: str | Path,
    adapter: str | Path,
    merged: str | Path,
    prompts: list[str] = PROMPTS,
    base_weights: str | None = None,
    quantization: dict | None = None,
    data: str | None = None,
) -> dict:
    """Max absolute logit difference between the merged model and base + adapter unmerged (fp32, over the base
    weights the merge used) on `prompts`; for QLoRA adapters also the trained model against both merges, and
    with `data` (chat JSONL) each model's held-out loss. `base_weights` and `quantization` as given to the merge.
    Loads whole models one after another: meant for checks, not for the memory-bounded merge itself."""
    from ftscale.evaluation.compare import heldout_loss

    base, adapter, merged = Path(base), Path(adapter), Path(merged)
    edits = read_adapter_edits(adapter)
    mode, record = choose_base_weights(base_weights, edits, quantization, str(adapter))
    # The adapter folder holds the tokenizer training used (with the chat template it added, if any).
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else merged)
    ensure_pad_token(tokenizer)
    candidate = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    merged_logits = _logits(candidate, tokenizer, prompts)
    report = {
        "verify_prompts": len(prompts),
        "base_weights": mode,
        "max_abs_logit_diff": _max_diff(merged_logits, _logits(_unmerged(base, adapter, record), tokenizer, prompts)),
    }
    if not edits.quantized_base or (record is None and edits.quantization is None):
        if data:
            report["heldout_loss"] = heldout_loss(candidate, tokenizer, data)
        return report
    # QLoRA: the merge that was written, the other one computed unmerged, and the trained model itself.
    record = record or edits.quantization
    models = {f"merge_into_{mode}": candidate}
    other = next(m for m in BASE_WEIGHTS if m != mode)
    models[f"merge_into_{other}"] = _unmerged(base, adapter, record if other == "dequantized" else None)
    trained = trained_model(base, adapter, record)
    trained_logits = _logits(trained, tokenizer, prompts)
    report["trained_model"] = {
        "max_abs_logit_diff": {name: _max_diff(trained_logits, _logits(m, tokenizer, prompts)) for name, m in models.items()},
    }
    if data:
        report["trained_model"]["heldout_loss"] = {
            name: heldout_loss(m, tokenizer, data) for name, m in {"trained": trained, **models}.items()
        }
    return report
