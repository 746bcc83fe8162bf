"""Check a merged model against base + adapter: the automated form of "merged weight == W + alpha/r * B @ A"."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftscale.methods import load_adapter

PROMPTS = ["The capital of Germany is", "Write a haiku about the sea.", "def fibonacci(n):"]


@torch.no_grad()
def verify_merge(base: str | Path, adapter: str | Path, merged: str | Path, prompts: list[str] = PROMPTS) -> dict:
    """Max absolute logit difference between base+adapter (unmerged, fp32) and the merged model (fp32) on
    `prompts`. Loads whole models: meant for checks, not for the memory-bounded merge itself."""
    tokenizer = AutoTokenizer.from_pretrained(merged)
    reference = load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    candidate = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    diffs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        diffs.append((reference(input_ids=ids).logits - candidate(input_ids=ids).logits).abs().max().item())
    return {"verify_prompts": len(prompts), "max_abs_logit_diff": max(diffs)}
