"""Which base weights a QLoRA adapter should be merged into (issue 15). Prints one JSON line.

    python bench/qlora_merge.py [--steps 24]

Needs the imported model (`make model`). Trains the SmolLM2 QLoRA demo config (configs/smollm2-135m/qlora.yaml),
merges its adapter into the original weights and into the dequantised 4-bit ones (fp32 output), and measures both
against the trained model (4-bit base + adapter, what training evaluated) on the demo's held-out data: the largest
logit difference on three prompts and the held-out loss of each model, plus each merge's time."""

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    from ftscale.config import load_config
    from ftscale.merge import stream_merge, verify_merge

    base = load_config(CONFIG).model.path
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        overrides = [f"training.output_dir={run}", f"training.max_steps={args.steps}", "logging.console=false"]
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ftscale.cli", "train", "--config", str(CONFIG), *overrides], check=True, cwd=REPO)
        train_s = time.perf_counter() - t
        merges, checks = {}, {}
        for mode in ("dequantized", "original"):
            out = Path(tmp) / mode
            report = stream_merge(base, run / "adapter", out, dtype="fp32", base_weights=mode, progress=False)
            merges[mode] = {"seconds": report["seconds"], "dequantized_tensors": report["dequantized_tensors"]}
            checks[mode] = verify_merge(base, run / "adapter", out, base_weights=mode, data=str(EVAL))
        trained = checks["dequantized"]["trained_model"]
        print(
            json.dumps(
                {
                    "bench": "qlora_merge",
                    "model": "SmolLM2-135M-Instruct",
                    "config": str(CONFIG.relative_to(REPO)),
                    "steps": args.steps,
                    "train_seconds": round(train_s, 1),
                    "merge": merges,
                    "max_abs_logit_diff_to_trained": trained["max_abs_logit_diff"],
                    "heldout_loss": trained["heldout_loss"],
                    "written_merge_vs_its_unmerged_sum": {m: c["max_abs_logit_diff"] for m, c in checks.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
