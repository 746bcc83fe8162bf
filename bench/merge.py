"""Streaming merge vs the seed notebook's merge, on a base of several GB. Prints one JSON line.

    python bench/merge.py [--work DIR] [--layers 12] [--hidden 2048] [--keep]

Builds (once, in --work) a random Llama-shaped fp32 base of about 3 GB written shard by shard, and a LoRA r=16
all-linear adapter; then runs, each in a fresh process so peak RSS is its own:
  streaming: ftscale.merge.stream_merge(base, adapter, out, max_shard_size="2GB")
  seed:      AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload().save_pretrained(out, max_shard_size="2GB")
Target (issue 5): streaming peak RSS <= 1/4 of the seed path's, and no slower."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

STREAMING = """
import resource, sys
from ftscale.merge import stream_merge
stream_merge(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_size="2GB", progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
SEED = """
import resource, sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
model.merge_and_unload().save_pretrained(sys.argv[3], max_shard_size="2GB")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def build_base(path: Path, layers: int, hidden: int, vocab: int = 32000) -> int:
    """Write a random fp32 Llama checkpoint one shard (one layer) at a time; never the whole model in memory."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    inter = int(hidden * 2.75)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=False,
    )
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    groups = [{"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (hidden, hidden),
                p + "self_attn.v_proj.weight": (hidden, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    weight_map, total = {}, 0
    for n, group in enumerate(groups, 1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: rand(*s) for k, s in group.items()}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: fname for k in group})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def build_adapter(base: Path, path: Path, r: int = 16) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    index = json.loads((base / "model.safetensors.index.json").read_text())
    from ftscale.merge.stream_merge import base_tensors

    infos = base_tensors(base)
    targets = [n for n in index["weight_map"] if n.endswith("proj.weight")]
    g = torch.Generator().manual_seed(1)
    state = {}
    for name in targets:
        module = name.removesuffix(".weight")
        out_f, in_f = infos[name].shape
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.01
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    ).save_pretrained(path)


def timed(script: str, base: Path, adapter: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script, str(base), str(adapter), str(out)], capture_output=True, text=True, cwd=REPO)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return {"seconds": round(seconds, 2), "peak_rss_bytes": int(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/ftscale-bench-merge")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--keep", action="store_true", help="keep the generated base and outputs")
    args = ap.parse_args()
    work = Path(args.work)
    base, adapter = work / "base", work / "adapter"
    if not (base / "model.safetensors.index.json").is_file():
        build_base(base, args.layers, args.hidden)
    if not (adapter / "adapter_config.json").is_file():
        build_adapter(base, adapter)
    base_bytes = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    streaming = timed(STREAMING, base, adapter, work / "out-streaming")
    seed = timed(SEED, base, adapter, work / "out-seed")
    result = {
        "bench": "merge",
        "base_bytes": base_bytes,
        "streaming": streaming,
        "seed": seed,
        "rss_ratio_streaming_over_seed": round(streaming["peak_rss_bytes"] / seed["peak_rss_bytes"], 3),
        "time_ratio_streaming_over_seed": round(streaming["seconds"] / seed["seconds"], 3),
    }
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
