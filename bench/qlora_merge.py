"""Which base weights a QLoRA adapter should be merged into (issue 15). Prints one JSON line.

    python bench/qlora_merge.py [--steps 24] [--seed 0]

Needs the imported model (`make model`). Trains the SmolLM2 QLoRA demo config (configs/smollm2-135m/qlora.yaml),
merges its adapter into the original weights and into the dequantised 4-bit ones (fp32 output), and measures both
against the trained model (4-bit base + adapter, what training evaluated) on the demo's 24 held-out conversations:
the largest logit difference on three prompts, the held-out loss and the exact match of greedy answers of each
model, plus each merge's time."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/smollm2-135m/qlora.yaml"
EVAL = REPO / "data/demo/eval.jsonl"


def exact_matches(models: dict, tokenizer) -> dict[str, float]:
    from ftscale.evaluation.compare import conversations, exact_match, generate_answers

    chats = conversations(str(EVAL), None)
    prompts, references = [c[:-1] for c in chats], [c[-1]["content"] for c in chats]
    out = {}
    for name, model in models.items():
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=48)
        out[name] = sum(exact_match(a, r) for a, r in zip(answers, references, strict=True)) / len(chats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftscale.config import load_config
    from ftscale.merge import read_adapter_edits, stream_merge, verify_merge
    from ftscale.merge.verify import trained_model

    base = load_config(CONFIG).model.path
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        overrides = [
            f"training.output_dir={run}",
            f"training.max_steps={args.steps}",
            f"training.seed={args.seed}",
            "logging.console=false",
        ]
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ftscale.cli", "train", "--config", str(CONFIG), *overrides], check=True, cwd=REPO)
        train_s = time.perf_counter() - t
        merges, checks, models = {}, {}, {}
        for mode in ("dequantized", "original"):
            out = Path(tmp) / mode
            report = stream_merge(base, run / "adapter", out, dtype="fp32", base_weights=mode, progress=False)
            merges[mode] = {"seconds": report["seconds"], "dequantized_tensors": report["dequantized_tensors"]}
            checks[mode] = verify_merge(base, run / "adapter", out, base_weights=mode, data=str(EVAL))
            models[f"merge_into_{mode}"] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        models["trained"] = trained_model(Path(base), run / "adapter", read_adapter_edits(run / "adapter").quantization)
        trained = checks["dequantized"]["trained_model"]
        print(
            json.dumps(
                {
                    "bench": "qlora_merge",
                    "model": "SmolLM2-135M-Instruct",
                    "config": str(CONFIG.relative_to(REPO)),
                    "steps": args.steps,
                    "seed": args.seed,
                    "train_seconds": round(train_s, 1),
                    "merge": merges,
                    "max_abs_logit_diff_to_trained": trained["max_abs_logit_diff"],
                    "heldout_loss": trained["heldout_loss"],
                    "exact_match": exact_matches(models, AutoTokenizer.from_pretrained(run / "adapter")),
                    "written_merge_vs_its_unmerged_sum": {m: c["max_abs_logit_diff"] for m, c in checks.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
