"""Training throughput side by side (issue 14): ftscale's recipe, a plain peft loop on padded batches, and TRL's
SFTTrainer, on the same model, data and hyperparameters (the seed notebook's: LoRA r=6, alpha 8, dropout 0.05,
all-linear, batch 2, accumulation 2, lr 2e-4, clip 0.3, constant schedule) for the same number of optimizer steps.
Prints one JSON line per system, then one with the ratios.

    python bench/train_throughput.py [--steps 8] [--systems ftscale,peft,trl] [--conversations 600]

Each system runs in its own process, so its peak RSS is its own (os.wait4). Real tokens are non-padding tokens;
loss tokens are the assistant tokens the loss is taken on. Data: bench/synthetic_chat.py (1-5 turns, log-normal
lengths). CPU and fp32 by default; on a CUDA machine the recipe's `auto` picks bf16. TRL is optional
(`pip install trl`); without it its line says so. Needs the imported model (`make model`)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
MODEL = REPO / ".cache/ftscale/models/SmolLM2-135M-Instruct"
SEED = {"r": 6, "alpha": 8, "dropout": 0.05, "batch": 2, "accumulation": 2, "lr": 2e-4, "clip": 0.3, "max_len": 512}


def seed_lora():
    from peft import LoraConfig

    return LoraConfig(
        r=SEED["r"], lora_alpha=SEED["alpha"], lora_dropout=SEED["dropout"], target_modules="all-linear", task_type="CAUSAL_LM"
    )


def run_ftscale(tmp: Path, steps: int, settings: list[str]) -> dict:
    from ftscale.config import load_config
    from ftscale.recipes.sft import recipe_main

    out = tmp / "ftscale"
    overrides = [
        f"data.train=[{{path: {tmp / 'train.jsonl'}}}]",
        f"data.eval=[{{path: {tmp / 'eval.jsonl'}}}]",
        f"data.cache_dir={tmp / 'cache'}",
        f"training.output_dir={out}",
        f"training.max_steps={steps}",
        "logging.console=false",
        *settings,
    ]
    summary = recipe_main(load_config(REPO / "configs/smollm2-135m/seed-notebook.yaml", overrides))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "time/train_s" in r]
    seconds = sum(r["time/train_s"] for r in train)
    return {
        "real_tokens_per_s": sum(r["perf/tokens_per_s"] * r["time/train_s"] for r in train) / seconds,
        "loss_tokens_per_s": sum(r["perf/loss_tokens_per_s"] * r["time/train_s"] for r in train) / seconds,
        "mfu": sum(r["perf/mfu"] * r["time/train_s"] for r in train) / seconds,
        "final_train_loss": summary["final_train_loss"],
        "eval_loss": summary["eval_loss_after"],
    }


def _examples(tmp: Path, tokenizer):
    """The same tokenized examples ftscale trains on (chat template, assistant-only loss, truncation)."""
    from ftscale.config.data import DataConfig, DataSource
    from ftscale.data import tokenize_sources

    examples, _ = tokenize_sources([DataSource(path=str(tmp / "train.jsonl"))], DataConfig(max_seq_len=SEED["max_len"]), tokenizer)
    return examples


def run_peft(tmp: Path, steps: int, settings: list[str]) -> dict:
    """The loop a careful user writes by hand: padded batches, the model's own loss, accumulation, clipping."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ftscale.config.model import ModelConfig
    from ftscale.evaluation.compare import heldout_loss
    from ftscale.model.loading import load_tokenizer

    torch.manual_seed(0)
    tokenizer, _ = load_tokenizer(ModelConfig(path=str(MODEL)))
    examples = _examples(tmp, tokenizer)
    order = torch.randperm(len(examples)).tolist()
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model = get_peft_model(model, seed_lora())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=SEED["lr"])
    model.train()
    real = loss_tokens = 0
    losses, start, k = [], time.perf_counter(), 0
    for _ in range(steps):
        for _ in range(SEED["accumulation"]):
            batch = [examples[order[(k + i) % len(order)]] for i in range(SEED["batch"])]
            k += SEED["batch"]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, e in enumerate(batch):
                n = len(e.input_ids)
                ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
            real += int(mask.sum())
            loss_tokens += int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss / SEED["accumulation"]).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), SEED["clip"])
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "real_tokens_per_s": real / seconds,
        "loss_tokens_per_s": loss_tokens / seconds,
        "final_train_loss": sum(losses[-SEED["accumulation"] :]) / SEED["accumulation"],
        "eval_loss": heldout_loss(model, tokenizer, str(tmp / "eval.jsonl")),
    }


def run_trl(tmp: Path, steps: int, settings: list[str]) -> dict:
    """TRL's SFTTrainer as the seed notebook configured it (gradient checkpointing on, no packing, TRL's default loss
    masking). Not yet run on this machine, where TRL is not installed: the figures so far are ftscale's and peft's."""
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return {"error": "trl is not installed here: pip install trl, then run this bench again"}
    from datasets import load_dataset

    config = SFTConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=SEED["batch"],
        gradient_accumulation_steps=SEED["accumulation"],
        learning_rate=SEED["lr"],
        max_grad_norm=SEED["clip"],
        lr_scheduler_type="constant",
        max_steps=steps,
        max_length=SEED["max_len"],
        gradient_checkpointing=True,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        logging_steps=1,
        save_strategy="no",
    )
    data = load_dataset("json", data_files=str(tmp / "train.jsonl"), split="train")
    trainer = SFTTrainer(model=str(MODEL), args=config, train_dataset=data, peft_config=seed_lora())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    real = trainer.state.num_input_tokens_seen  # the tokens it trained on, padding excluded
    return {"real_tokens_per_s": real / seconds, "final_train_loss": trainer.state.log_history[-2].get("loss")}


RUNNERS = {"ftscale": run_ftscale, "peft": run_peft, "trl": run_trl}


def child(system: str, tmp: Path, steps: int, settings: list[str]) -> dict:
    """Run one system in its own process; its result and peak RSS (KiB on Linux, from wait4)."""
    command = [sys.executable, __file__, "--run", system, "--tmp", str(tmp), "--steps", str(steps), *(f"--set={s}" for s in settings)]
    proc = subprocess.Popen(command, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    result_file = tmp / f"{system}.json"
    if os.waitstatus_to_exitcode(status) or not result_file.is_file():
        return {"system": system, "error": f"exited with {os.waitstatus_to_exitcode(status)}"}
    return {"system": system, **json.loads(result_file.read_text()), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--systems", default="ftscale,peft,trl")
    ap.add_argument("--conversations", type=int, default=600)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for ftscale's run")
    ap.add_argument("--run", choices=list(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        (args.tmp / f"{args.run}.json").write_text(json.dumps(RUNNERS[args.run](args.tmp, args.steps, args.set)))
        return
    from synthetic_chat import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "train.jsonl", args.conversations, seed=0)
        write_dataset(tmp / "eval.jsonl", 32, seed=1)
        results = {}
        for system in args.systems.split(","):
            results[system] = child(system, tmp, args.steps, args.set if system == "ftscale" else [])
            print(json.dumps({"bench": "train_throughput", "steps": args.steps, "settings": args.set, **results[system]}), flush=True)
    ratios = {}
    base = results.get("peft", {})
    for system in ("ftscale", "trl"):
        if "real_tokens_per_s" in results.get(system, {}) and "real_tokens_per_s" in base:
            ratios[f"{system}_over_peft_tokens_per_s"] = round(results[system]["real_tokens_per_s"] / base["real_tokens_per_s"], 3)
    if "peak_rss_gb" in results.get("ftscale", {}) and "peak_rss_gb" in base:
        ratios["ftscale_over_peft_peak_rss"] = round(results["ftscale"]["peak_rss_gb"] / base["peak_rss_gb"], 3)
    print(json.dumps({"bench": "train_throughput", "ratios": ratios}))


if __name__ == "__main__":
    main()
