"""Checkpoint save/load time and size for SmolLM2-135M-Instruct with LoRA r=6 (issue 4). Prints one JSON line.

    python bench/checkpoint.py [--repeats 5]

Needs the imported model (`make model`). Trains one step so the optimizer state exists, then times
`CheckpointStore.save` and a full resume (`CheckpointStore.load`) (verify checksums, restore parameters, optimizer, schedule, RNG)."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from ftscale.config import load_config
    from ftscale.recipes.sft import SFTRecipe

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join((REPO / "data/demo/train.jsonl").read_text().splitlines(keepends=True)[:4]))
        cfg = load_config(
            REPO / "configs/smollm2-135m/lora.yaml",
            [
                f"data.train=[{{path: {data}}}]",
                "data.eval=[]",
                f"training.output_dir={tmp}/run",
                "training.max_steps=1",
                "training.gradient_accumulation_steps=1",
                "method.lora.r=6",
                "data.max_seq_len=128",
                "logging.console=false",
                "checkpoint.keep_last=100",
            ],
        )
        recipe = SFTRecipe(cfg)
        recipe.setup()
        recipe.train()  # writes step 1
        save_s, load_s = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            path = recipe.store.save(recipe.state)
            save_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            recipe.store.load(recipe.store.find_resume())
            load_s.append(time.perf_counter() - t)
        files = [p for p in path.rglob("*") if p.is_file()]
        sizes = {sub: sum(p.stat().st_size for p in (path / sub).rglob("*") if p.is_file()) for sub in ("adapter", "optimizer", "rng")}
        recipe.cleanup()
        print(
            json.dumps(
                {
                    "bench": "checkpoint",
                    "model": "SmolLM2-135M-Instruct",
                    "method": "lora",
                    "r": 6,
                    "save_s_median": round(statistics.median(save_s), 4),
                    "load_s_median": round(statistics.median(load_s), 4),
                    "bytes_total": sum(p.stat().st_size for p in files),
                    "bytes_adapter": sizes["adapter"],
                    "bytes_optimizer": sizes["optimizer"],
                    "bytes_rng": sizes["rng"],
                    "files": len(files),
                    "base_model_bytes": (Path(cfg.model.path) / "model.safetensors").stat().st_size,
                }
            )
        )


if __name__ == "__main__":
    main()
