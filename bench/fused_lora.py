"""What `training.fused_cpu_lora` saves a CPU step, measured in one process on the same work. Prints one JSON line.

    python bench/fused_lora.py [--pairs 5] [--conversations 600] [--set KEY=VALUE ...]

The seed notebook's recipe on SmolLM2-135M-Instruct (bench/train_throughput.py's config and data) is set up once;
then one optimizer step on the same micro-batches is run again and again, its LoRA layers switched between
FusedCPULoraLinear and peft's own Linear before each run, in ABBA order (an odd --pairs ends on AB). Alternating
inside one process puts both sides under the same machine load, which on a shared machine drifts by 10-20% between
separate runs. Wall and process CPU seconds are summed per side; peak RSS is not measured (both sides share the
process: bench/train_throughput.py gives each run's). Needs the imported model (`make model`)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import positive  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=positive, default=5)
    ap.add_argument("--conversations", type=positive, default=600)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = ap.parse_args()

    import train_throughput
    from peft.tuners.lora.layer import Linear as LoraLinear
    from synthetic_chat import write_dataset

    from ftscale.model.kernels import FusedCPULoraLinear
    from ftscale.recipes.sft import SFTRecipe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "train.jsonl", args.conversations, seed=0)
        write_dataset(tmp / "eval.jsonl", 32, seed=1)
        settings = argparse.Namespace(steps=8, model=train_throughput.MODEL, method="lora", set=args.set, same_batches=False)
        recipe = SFTRecipe(train_throughput.ftscale_config(tmp, settings))
        recipe.setup()
        layers = [m for m in recipe.model.modules() if isinstance(m, LoraLinear)]
        recipe.train_step(0)  # one-off costs (allocator warm-up) outside the figures
        sides = {"fused": FusedCPULoraLinear, "peft": LoraLinear}
        seconds = {name: {"wall": 0.0, "cpu": 0.0} for name in sides}
        for k in range(2 * args.pairs):
            name = ("fused", "peft", "peft", "fused")[k % 4]
            for layer in layers:
                layer.__class__ = sides[name]
            wall, cpu = time.perf_counter(), time.process_time()
            recipe.train_step(1)
            seconds[name]["wall"] += time.perf_counter() - wall
            seconds[name]["cpu"] += time.process_time() - cpu
        tokens = recipe.sampler.step_totals(1).tokens
        recipe.cleanup()
    result = {"bench": "fused_lora", "pairs": args.pairs, "lora_layers": len(layers), "step_tokens": tokens}
    for name, s in seconds.items():
        result[name] = {
            "wall_s": round(s["wall"], 2),
            "cpu_s": round(s["cpu"], 2),
            "tokens_per_s": round(tokens * args.pairs / s["wall"], 1),
        }
    result["wall_ratio_fused_over_peft"] = round(seconds["fused"]["wall"] / seconds["peft"]["wall"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
