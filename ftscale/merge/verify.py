"""Check a merged model against base + adapter: the automated form of "merged weight == W + alpha/r * B @ A".

For QLoRA adapters it also measures the choice of base weights: the trained model (4-bit base + adapter, loaded the
way the recipe loads it) against the merge into the original weights and the merge into the dequantised ones."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftscale.config import FtscaleConfig
from ftscale.data import ensure_pad_token
from ftscale.merge.adapter_edits import read_adapter_edits
from ftscale.merge.quantized_base import BASE_WEIGHTS, as_trained, choose_base_weights, quantized_tensors, replay_settings
from ftscale.methods import load_adapter
from ftscale.model.auto_settings import DeviceCapabilities, resolve_auto
from ftscale.model.loading import load_base_model

PROMPTS = ["The capital of Germany is", "Write a haiku about the sea.", "def fibonacci(n):"]
DEFAULT_BLOCKSIZE = 64  # the only one transformers quantises with when it loads a 4-bit model


def _resized(model, vocab: int):
    if vocab > model.get_input_embeddings().weight.shape[0]:  # the run added chat tokens (see load_tokenizer)
        model.resize_token_embeddings(vocab)
    return model


def _unmerged(base: Path, adapter: Path, record: dict | None, vocab: int) -> torch.nn.Module:
    """base + adapter in fp32, unmerged; with `record`, the base first as training held it (as_trained): the merge
    into the dequantised weights, computed without merging."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if record is not None:
        state = model.state_dict()
        replay = quantized_tensors(record, {n: tuple(t.shape) for n, t in state.items()})
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(as_trained(name, tensor, record, replay))
    return load_adapter(_resized(model, vocab), adapter).eval()


def trained_model(base: Path, adapter: Path, record: dict, vocab: int) -> torch.nn.Module:
    """The model training computed with, loaded by the recipe's own path (load_base_model: 4-bit quantisation with
    the run's settings, bitsandbytes' CPU repack off, peft's k-bit preparation), plus the adapter."""
    q = {k: record[k] for k in ("quant_type", "double_quant", "compute_dtype", "quant_storage")}
    cfg = FtscaleConfig.model_validate({"model": {"path": str(base)}, "method": {"name": "qlora", "quantization": q}})
    cfg, _ = resolve_auto(cfg, DeviceCapabilities.detect())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return load_adapter(load_base_model(cfg, device, vocab_size=vocab), adapter).eval()


@torch.no_grad()
def _measure(model, tokenizer, prompts: list[str], data: str | None) -> tuple[list[torch.Tensor], float | None]:
    """(logits for each prompt, held-out loss on `data` or None); then the model can go."""
    from ftscale.evaluation.compare import heldout_loss

    device = next(model.parameters()).device
    logits = [model(input_ids=tokenizer(p, return_tensors="pt")["input_ids"].to(device)).logits.float().cpu() for p in prompts]
    return logits, heldout_loss(model, tokenizer, data) if data else None


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _release(model) -> None:
    del model
    gc.collect()


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
    Loads whole models, one at a time: meant for checks, not for the memory-bounded merge itself."""
    base, adapter, merged = Path(base), Path(adapter), Path(merged)
    edits = read_adapter_edits(adapter)
    mode, record = choose_base_weights(base_weights, edits, quantization, str(adapter))
    # The adapter folder holds the tokenizer training used (with the chat template it added, if any).
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else merged)
    ensure_pad_token(tokenizer)
    vocab = len(tokenizer)

    candidate = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    merged_logits, merged_loss = _measure(candidate, tokenizer, prompts, data)
    _release(candidate)
    reference = _unmerged(base, adapter, record, vocab)
    report = {
        "verify_prompts": len(prompts),
        "base_weights": mode,
        "max_abs_logit_diff": _max_diff(merged_logits, _measure(reference, tokenizer, prompts, None)[0]),
    }
    _release(reference)
    if data:
        report["heldout_loss"] = merged_loss
    settings = replay_settings(edits, quantization, str(adapter)) if edits.quantized_base is not False else None
    if settings is None or settings["blocksize"] != DEFAULT_BLOCKSIZE:
        if edits.quantized_base:
            report["note"] = (
                "QLoRA adapter: not compared with the trained 4-bit model, whose quantisation is unknown here (pass "
                "--quant-type and its options) or uses a block size transformers cannot load with"
            )
        return report
    # QLoRA: the merge that was written, the other one computed unmerged, and the trained model itself.
    other = next(m for m in BASE_WEIGHTS if m != mode)
    results = {f"merge_into_{mode}": (merged_logits, merged_loss)}
    model = _unmerged(base, adapter, settings if other == "dequantized" else None, vocab)
    results[f"merge_into_{other}"] = _measure(model, tokenizer, prompts, data)
    _release(model)
    model = trained_model(base, adapter, settings, vocab)
    trained_logits, trained_loss = _measure(model, tokenizer, prompts, data)
    _release(model)
    report["trained_model"] = {"max_abs_logit_diff": {name: _max_diff(trained_logits, logits) for name, (logits, _) in results.items()}}
    if data:
        report["trained_model"]["heldout_loss"] = {"trained": trained_loss, **{name: loss for name, (_, loss) in results.items()}}
    return report
