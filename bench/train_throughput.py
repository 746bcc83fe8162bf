"""Training throughput side by side (issue 14): ftscale's recipe, a plain peft loop on padded batches, and TRL's
SFTTrainer, on the same model, data and hyperparameters (the seed notebook's: LoRA r=6, alpha 8, dropout 0.05,
all-linear, batch 2, accumulation 2, lr 2e-4, clip 0.3, constant schedule) for the same number of optimizer steps.
Prints one JSON line per system, then one with the ratios.

    python bench/train_throughput.py [--steps 8] [--systems ftscale,peft,trl] [--conversations 600] [--repeats 1]
                                     [--model DIR] [--method lora|qlora] [--set KEY=VALUE ...]

Each system runs in its own process, so its peak RSS is its own (os.wait4). With `--repeats N` the systems run N
times in ABBA order (this shared machine's speed drifts by 10-20% over minutes) and each system's figures are over
all its runs. Real tokens are non-padding tokens;
loss tokens are the assistant tokens the loss is taken on. Data: bench/synthetic_chat.py (1-5 turns, log-normal
lengths). CPU and fp32 by default; on a CUDA machine every system trains in bf16 (the recipe's `auto` picks it),
each line adds the peak CUDA memory, and ftscale's its memory estimate (ftscale.model.memory_estimate). TRL is
optional (`pip install -e '.[bench]'`); without it its line says so. Needs the imported model (`make model`) or `--model`
(bench/random_model.py makes one of any shape)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
MODEL = REPO / ".cache/ftscale/models/SmolLM2-135M-Instruct"
SEED = {"r": 6, "alpha": 8, "dropout": 0.05, "batch": 2, "accumulation": 2, "lr": 2e-4, "clip": 0.3, "max_len": 512}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def dtype():
    import torch

    return torch.bfloat16 if cuda() else torch.float32


def quantization():
    """QLoRA's 4-bit base, as ftscale's defaults make it (NF4, double quantisation, uint8 storage)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype())


def seed_lora():
    from peft import LoraConfig

    return LoraConfig(
        r=SEED["r"], lora_alpha=SEED["alpha"], lora_dropout=SEED["dropout"], target_modules="all-linear", task_type="CAUSAL_LM"
    )


def ftscale_config(tmp: Path, args):
    """ftscale's config for this run: the seed notebook's, on this model and data, with `--set` overrides (and
    with `--same-batches`, one example per row)."""
    from ftscale.config import load_config

    steps, model, method = args.steps, args.model, args.method
    settings = [*args.set, *(["data.packing=false"] if args.same_batches else [])]
    overrides = [
        f"model.path={model}",
        f"method.name={method}",
        f"data.train=[{{path: {tmp / 'train.jsonl'}}}]",
        f"data.eval=[{{path: {tmp / 'eval.jsonl'}}}]",
        f"data.cache_dir={tmp / 'cache'}",
        f"training.output_dir={tmp / 'ftscale'}",
        f"training.max_steps={steps}",
        "logging.console=false",
        *settings,
    ]
    return load_config(REPO / "configs/smollm2-135m/seed-notebook.yaml", overrides)


def run_ftscale(tmp: Path, args) -> dict:
    from ftscale.model.auto_settings import DeviceCapabilities, resolve_auto
    from ftscale.model.memory_estimate import ModelShape, estimate_training_memory
    from ftscale.recipes.sft import recipe_main

    out = tmp / "ftscale"
    cfg = ftscale_config(tmp, args)
    device = DeviceCapabilities.detect()
    resolved, chosen = resolve_auto(cfg, device)
    estimate = estimate_training_memory(ModelShape.read(args.model), resolved, resolved.training.gradient_checkpointing, device.cuda)
    summary = recipe_main(cfg)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "time/train_s" in r]
    seconds = sum(r["time/train_s"] for r in train)
    return {
        "real_tokens_per_s": sum(r["perf/tokens_per_s"] * r["time/train_s"] for r in train) / seconds,
        "loss_tokens_per_s": sum(r["perf/loss_tokens_per_s"] * r["time/train_s"] for r in train) / seconds,
        "mfu": sum(r["perf/mfu"] * r["time/train_s"] for r in train) / seconds,
        # Without the first two steps, which pay one-off costs (torch.compile's compilation, allocator warm-up).
        "real_tokens_per_s_after_step_2": sum(r["perf/tokens_per_s"] * r["time/train_s"] for r in train[2:])
        / max(sum(r["time/train_s"] for r in train[2:]), 1e-9),
        "final_train_loss": summary["final_train_loss"],
        "eval_loss": summary["eval_loss_after"],
        "auto": chosen,
        # The recipe's own peak over the training steps (evaluation apart), which the estimate is for.
        "train_peak_cuda_gb": max((r.get("mem/device_max_allocated_gb", 0) for r in train), default=None) if cuda() else None,
        "memory_estimate_gb": {k: round(v / 1e9, 3) for k, v in {**vars(estimate), "total": estimate.total}.items()},
    }


def micro_batches(tmp: Path, tokenizer, args):
    """Each optimizer step's micro-batches, as lists of (input_ids, labels): the same tokenized examples ftscale
    trains on (chat template, assistant-only loss, truncation), in the loop's own shuffle; or with `--same-batches`
    exactly the batches ftscale's sampler gives its unpacked rows (the same data in the same order)."""
    import torch

    from ftscale.config.data import DataConfig, DataSource
    from ftscale.data import StepSampler, build_datasets, tokenize_sources

    steps = args.steps
    if args.same_batches:
        cfg = ftscale_config(tmp, args)
        t = cfg.training
        sampler = StepSampler(
            build_datasets(cfg.data, tokenizer, t.seed, 0).train, t.micro_batch_size, t.gradient_accumulation_steps, 0, 1, t.seed
        )
        for step in range(steps):
            yield [[(r.input_ids, r.labels) for r in rows] for rows in sampler.micro_batches(step)]
        return
    examples, _ = tokenize_sources([DataSource(path=str(tmp / "train.jsonl"))], DataConfig(max_seq_len=SEED["max_len"]), tokenizer)
    order, k = torch.randperm(len(examples)).tolist(), 0
    for _ in range(steps):
        step = []
        for _ in range(SEED["accumulation"]):
            step.append(
                [
                    (examples[order[(k + i) % len(order)]].input_ids, examples[order[(k + i) % len(order)]].labels)
                    for i in range(SEED["batch"])
                ]
            )
            k += SEED["batch"]
        yield step


def run_peft(tmp: Path, args) -> dict:
    """The loop a careful user writes by hand: padded batches, the model's own loss, accumulation, clipping."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ftscale.config.model import ModelConfig
    from ftscale.model.loading import load_tokenizer

    torch.manual_seed(0)
    model_dir = args.model
    tokenizer, _ = load_tokenizer(ModelConfig(path=str(model_dir)))
    steps_data = list(micro_batches(tmp, tokenizer, args))
    device = "cuda" if cuda() else "cpu"
    if args.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype(), quantization_config=quantization(), device_map=device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype()).to(device)
    model = get_peft_model(model, seed_lora())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=SEED["lr"])
    model.train()
    real = loss_tokens = 0
    losses, start = [], time.perf_counter()
    for step in steps_data:
        for batch in step:
            width = max(len(input_ids) for input_ids, _ in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (input_ids, row_labels) in enumerate(batch):
                n = len(input_ids)
                ids[r, :n], labels[r, :n], mask[r, :n] = torch.as_tensor(input_ids), torch.as_tensor(row_labels), 1
            real += int(mask.sum())
            loss_tokens += int((labels[:, 1:] != -100).sum())
            with torch.autocast(device, dtype=dtype(), enabled=cuda()):
                loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
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
        "eval_loss": ftscale_heldout_loss(model, tokenizer, tmp, args, device),
    }


def ftscale_heldout_loss(model, tokenizer, tmp: Path, args, device) -> float:
    """The held-out loss exactly as ftscale's recipe measures it (its held-out rows: the same truncation to
    max_seq_len, token-weighted), so the two systems' figures compare."""
    import torch

    from ftscale.data import build_datasets, collate
    from ftscale.evaluation.heldout import summed_loss

    cfg = ftscale_config(tmp, args)
    rows = build_datasets(cfg.data, tokenizer, cfg.training.seed, 0).eval
    with torch.no_grad():
        sums = [summed_loss(model, [row], lambda rows: collate(rows, tokenizer.pad_token_id, packed=False), device) for row in rows]
    return sum(s for s, _ in sums) / sum(n for _, n in sums)


def run_trl(tmp: Path, args) -> dict:
    """TRL's SFTTrainer as the seed notebook configured it (gradient checkpointing on, no packing, TRL's default loss
    masking); bf16 on CUDA, and for QLoRA the same 4-bit base as the others."""
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
        max_steps=args.steps,
        max_length=SEED["max_len"],
        gradient_checkpointing=True,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        bf16=cuda(),
        model_init_kwargs={"dtype": dtype(), **({"quantization_config": quantization()} if args.method == "qlora" else {})},
    )
    data = load_dataset("json", data_files=str(tmp / "train.jsonl"), split="train")
    trainer = SFTTrainer(model=str(args.model), args=config, train_dataset=data, peft_config=seed_lora())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    real = trainer.state.num_input_tokens_seen  # the tokens it trained on, padding excluded
    return {"real_tokens_per_s": real / seconds, "final_train_loss": trainer.state.log_history[-2].get("loss")}


RUNNERS = {"ftscale": run_ftscale, "peft": run_peft, "trl": run_trl}


def child(system: str, tmp: Path, args, settings: list[str]) -> dict:
    """Run one system in its own process; its result and peak RSS (KiB on Linux, from wait4)."""
    command = [sys.executable, __file__, "--run", system, "--tmp", str(tmp), "--steps", str(args.steps), "--model", str(args.model)]
    command += ["--method", args.method, *(f"--set={s}" for s in settings), *(["--same-batches"] if args.same_batches else [])]
    result_file = tmp / f"{system}.json"
    # A run repeated (--repeats) starts afresh: an earlier run's output folder would be resumed as finished.
    shutil.rmtree(tmp / system, ignore_errors=True)
    result_file.unlink(missing_ok=True)
    proc = subprocess.Popen(command, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) or not result_file.is_file():
        return {"system": system, "error": f"exited with {os.waitstatus_to_exitcode(status)}"}
    return {"system": system, **json.loads(result_file.read_text()), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def combined(runs: list[dict]) -> dict:
    """One system's repeated runs as one: speeds over the total time (the runs do the same work), the highest peak
    RSS, the rest from the last run; a failed run stands for the whole."""
    failed = [r for r in runs if "error" in r]
    if failed or len(runs) == 1:
        return (failed or runs)[0]
    out = dict(runs[-1])
    for key in ("real_tokens_per_s", "loss_tokens_per_s"):
        out[key] = len(runs) / sum(1 / r[key] for r in runs)
    out["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=positive, default=8)
    ap.add_argument("--systems", default="ftscale,peft,trl")
    ap.add_argument("--conversations", type=positive, default=600)
    ap.add_argument("--repeats", type=positive, default=1, help="run the systems this many times, in ABBA order; figures over all runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for ftscale's run")
    ap.add_argument("--model", type=Path, default=MODEL, help="model folder (default: the imported SmolLM2-135M-Instruct)")
    ap.add_argument("--method", choices=["lora", "qlora"], default="lora")
    ap.add_argument(
        "--same-batches",
        action="store_true",
        help="ftscale without packing, and the peft loop on ftscale's very micro-batches: the same data in the same order",
    )
    ap.add_argument("--run", choices=list(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        result = RUNNERS[args.run](args.tmp, args)
        if cuda():
            import torch

            result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
            result["device"] = torch.cuda.get_device_name()
        (args.tmp / f"{args.run}.json").write_text(json.dumps(result))
        return
    from synthetic_chat import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "train.jsonl", args.conversations, seed=0)
        write_dataset(tmp / "eval.jsonl", 32, seed=1)
        systems = args.systems.split(",")
        runs = {system: [] for system in systems}
        head = {"bench": "train_throughput", "model": args.model.name, "method": args.method, "steps": args.steps}
        head |= {"settings": args.set, "same_batches": args.same_batches}
        for round_ in range(args.repeats):
            for system in systems if round_ % 2 == 0 else systems[::-1]:  # ABBA: drift over the run falls on both
                # With --same-batches the loop reads ftscale's data settings too, to take the same batches.
                runs[system].append(child(system, tmp, args, args.set if system == "ftscale" or args.same_batches else []))
                print(json.dumps({**head, "round": round_, **runs[system][-1]}), flush=True)
    results = {system: combined(results) for system, results in runs.items()}
    ratios = {}
    base = results.get("peft", {})
    for system in ("ftscale", "trl"):
        if "real_tokens_per_s" in results.get(system, {}) and "real_tokens_per_s" in base:
            ratios[f"{system}_over_peft_tokens_per_s"] = round(results[system]["real_tokens_per_s"] / base["real_tokens_per_s"], 3)
    if "peak_rss_gb" in results.get("ftscale", {}) and "peak_rss_gb" in base:
        ratios["ftscale_over_peft_peak_rss"] = round(results["ftscale"]["peak_rss_gb"] / base["peak_rss_gb"], 3)
    for system in ("ftscale", "peft"):
        if "real_tokens_per_s" in results.get(system, {}) and "real_tokens_per_s" in results.get("trl", {}):
            ratios[f"{system}_over_trl_tokens_per_s"] = round(results[system]["real_tokens_per_s"] / results["trl"]["real_tokens_per_s"], 3)
    summary = {"bench": "train_throughput", "model": args.model.name, "method": args.method, "repeats": args.repeats}
    summary |= {"tokens_per_s": {s: r["real_tokens_per_s"] for s, r in results.items() if "real_tokens_per_s" in r}}
    print(json.dumps({**summary, "ratios": ratios}), flush=True)


if __name__ == "__main__":
    main()
