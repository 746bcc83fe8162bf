"""A randomly initialised model with a real model's tokenizer, for throughput and memory benches on machines that
cannot hold or fetch the real weights (random weights train at the same speed).

    python bench/random_model.py --like .cache/ftscale/models/SmolLM2-135M-Instruct --out /tmp/m [--hidden 2048 ...]

`--like` supplies config.json and the tokenizer files; the shape options override the config. Weights are written
in bfloat16 (`--dtype` to change)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHAPE = {
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def build(like: Path, out: Path, dtype: str = "bfloat16", untied: bool = False, **shape: int) -> int:
    """Write the model; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(like)
    for option, value in shape.items():
        if value is not None:
            setattr(config, SHAPE[option], value)
    if untied:
        config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (like / name).is_file():
            shutil.copy(like / name, out / name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--like", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--untied", action="store_true", help="separate input embedding and output head")
    for option in SHAPE:
        ap.add_argument(f"--{option.replace('_', '-')}", type=int)
    args = ap.parse_args()
    shape = {k: getattr(args, k) for k in SHAPE}
    params = build(args.like, args.out, args.dtype, args.untied, **shape)
    print(json.dumps({"bench": "random_model", "out": str(args.out), "parameters": params, **shape}))


if __name__ == "__main__":
    main()
