"""Before/after evaluation on held-out chat data: token-weighted held-out loss, greedy answers and exact match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftscale.config.data import DataConfig, DataSource
from ftscale.data import IGNORE_INDEX, ensure_pad_token, tokenize_sources
from ftscale.data.formats import to_example
from ftscale.data.packing import collate, packed_row
from ftscale.data.sources import DataError, read_rows
from ftscale.evaluation.heldout import summed_loss
from ftscale.methods import load_adapter
from ftscale.methods.bottleneck import is_bottleneck_adapter
from ftscale.model.loading import check_model_path
from ftscale.training.loss import loss_on_labelled_positions, model_loss, supports_labelled_head


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after trimming whitespace, or both valid JSON with equal values (key order and spacing ignored)."""
    if prediction.strip() == reference.strip():
        return True
    try:
        return json.loads(prediction) == json.loads(reference)
    except (json.JSONDecodeError, TypeError):
        return False


def load_model(path: str | Path, base: str | Path) -> torch.nn.Module:
    """A full model folder, or an adapter folder applied to `base`."""
    path = Path(path)
    if (path / "adapter_config.json").is_file() or is_bottleneck_adapter(path):
        return load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), path).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def heldout_loss(model, tokenizer, data: str) -> float:
    cfg = DataConfig(train=[], eval=[], packing=False, max_seq_len=2048)
    examples, _ = tokenize_sources([DataSource(path=data)], cfg, tokenizer)
    device = next(model.parameters()).device
    rows = [packed_row([(np.asarray(ex.input_ids), np.asarray(ex.labels) != IGNORE_INDEX)], packed=False) for ex in examples]
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)  # changes the sequence
    loss = loss_on_labelled_positions if supports_labelled_head(model) and not prompt_learning else model_loss
    sums = [summed_loss(model, [row], lambda rows: collate(rows, tokenizer.pad_token_id, packed=False), device, loss) for row in rows]
    if not sum(n for _, n in sums):
        raise DataError(f"{data}: no example with an answer to take a loss on")
    return sum(s for s, _ in sums) / sum(n for _, n in sums)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    tokenizer.padding_side = "left"  # generation continues from the right edge
    answers = []
    for i in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[i : i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def conversations(data: str, limit: int | None) -> list[list[dict]]:
    """Chat rows whose last message is the assistant's reference answer."""
    chats = []
    for item in read_rows(DataSource(path=data)):
        messages = to_example(item.parse(), "messages", item.where).messages
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{item.where}: the last message must be the assistant's reference answer")
        chats.append(messages)
    if not chats[:limit]:
        raise DataError(f"{data}: no conversation to compare on" + (f" (--limit {limit})" if limit is not None else ""))
    return chats[:limit]


def compare_models(base: str, tuned: str, data: str, max_new_tokens: int = 48, limit: int | None = None) -> dict:
    check_model_path(base, "--base")
    if not (Path(tuned) / "adapter_config.json").is_file() and not is_bottleneck_adapter(tuned):
        check_model_path(tuned, "--tuned")
    chats = conversations(data, limit)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ensure_pad_token(tokenizer)
    prompts = [c[:-1] for c in chats]
    references = [c[-1]["content"] for c in chats]
    report: dict = {"examples": len(chats), "models": {}}
    for label, path in (("base", None), ("tuned", tuned)):
        model = load_model(path, base) if path else AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens)
        matches = [exact_match(a, r) for a, r in zip(answers, references, strict=True)]
        report["models"][label] = {
            "heldout_loss": heldout_loss(model, tokenizer, data),
            "exact_match": sum(matches) / len(matches),
            "answers": answers,
        }
        del model
    report["prompts"] = [p[-1]["content"] for p in prompts]
    report["references"] = references
    return report


def print_report(report: dict, show: int = 5) -> None:
    base, tuned = report["models"]["base"], report["models"]["tuned"]
    for i in range(min(show, report["examples"])):
        print(f"\nprompt:    {report['prompts'][i]}")
        print(f"reference: {report['references'][i]}")
        print(f"base:      {base['answers'][i][:200]}")
        print(f"tuned:     {tuned['answers'][i][:200]}")
    print(f"\n{'':12}{'held-out loss':>15}{'exact match':>14}")
    for label, m in (("base", base), ("fine-tuned", tuned)):
        print(f"{label:12}{m['heldout_loss']:>15.4f}{m['exact_match']:>13.0%}")
