"""Each rank's anonymous memory over time under FSDP2, while loading the base and during one LoRA step (issue 14).
Prints one JSON line per rank.

    python bench/fsdp_memory.py                             # a 745M-parameter random Llama, 2 CPU processes
    python bench/fsdp_memory.py --hidden 256 --layers 4     # a small one, to try the bench
    python bench/fsdp_memory.py --repo /work/main           # the same run on another checkout's ftscale (before/after)

The model is a random untied Llama (fp32, SmolLM2's tokenizer and its vocabulary of 49152) saved as safetensors in a
temporary folder; `--set key=value` passes more ftscale overrides. The ranks are launched with the checkout's
configs/accelerate/fsdp2.yaml (rank 0 reads the base, the others receive their shards).

The figure is RssAnon from /proc/<pid>/status, sampled from this process every `--interval` seconds: unlike
ru_maxrss (bench/loading.py), it leaves out the memory-mapped pages of the safetensors files, which the page cache
shares between ranks. A sitecustomize module that only this script installs marks on each rank when
`SFTRecipe._setup_model` (loading, adapter, sharding) and `train_step` begin and end; each sample gets the phase of
the last mark before it. The ideal a rank approaches is its shard of the base plus one gathered decoder layer,
above what it held before loading (the interpreter, torch, the tokenizer and the data)."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from one_step_launch import one_step_command  # noqa: E402  (a bench module beside this one)

SMOLLM2 = ".cache/ftscale/models/SmolLM2-135M-Instruct"  # its tokenizer; `ftscale import-gguf` writes it
GB = 1e9
# Installed in the ranks only (RANK is set): the first process of a rank to start claims its marks file (a process
# it spawns later finds the file taken), writes its pid, then one line per phase change.
MARKS = """\
import os, time
if os.environ.get("RANK") is not None and os.environ.get("FSDP_MEMORY_MARKS"):
    path = os.path.join(os.environ["FSDP_MEMORY_MARKS"], "rank" + os.environ["RANK"])
    try:
        marks = os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w", buffering=1)
    except FileExistsError:
        marks = None
    if marks is not None:
        marks.write(f"{time.time()} {os.getpid()} startup\\n")
        import ftscale.recipes.sft as sft

        def marked(original, during, after):
            def call(*a, **k):
                marks.write(f"{time.time()} {os.getpid()} {during}\\n")
                try:
                    return original(*a, **k)
                finally:
                    marks.write(f"{time.time()} {os.getpid()} {after}\\n")
            return call

        sft.SFTRecipe._setup_model = marked(sft.SFTRecipe._setup_model, "loading", "setup")
        sft.SFTRecipe.train_step = marked(sft.SFTRecipe.train_step, "training", "after training")
"""


def build_model(out: Path, hidden: int, layers: int, intermediate: int | None) -> dict:
    """A random untied Llama with SmolLM2's tokenizer, saved in `out`; returns its sizes in bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_dir = REPO / SMOLLM2
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise SystemExit(f"{tokenizer_dir}: no tokenizer; `ftscale import-gguf` (make model) writes SmolLM2 there")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    heads = hidden // 64
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 256 * math.ceil(8 * hidden / 3 / 256),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 4 if heads % 4 == 0 else heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    sizes = {
        "params": sum(p.numel() for p in model.parameters()),
        "model": sum(p.numel() * p.element_size() for p in model.parameters()),
        "layer": sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()),
        "embedding": model.model.embed_tokens.weight.nbytes,
    }
    del model
    return sizes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_anon_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):  # the rank has ended
        return None


def read_marks(folder: Path) -> dict[int, list[tuple[float, int, str]]]:
    """Per rank, its (time, pid, phase) marks; the first line's pid is the rank's."""
    marks = {}
    for path in folder.glob("rank*"):
        lines = [line.split(maxsplit=2) for line in path.read_text().splitlines()]
        marks[int(path.name[4:])] = [(float(t), int(pid), phase) for t, pid, phase in lines]
    return marks


def run(tmp: Path, args, model_dir: Path) -> tuple[list[tuple[float, int, int]], dict, float]:
    """Launch the 2 ranks and sample them until they end: (samples (time, rank, kB), marks per rank, start time)."""
    inject, marks_dir = tmp / "inject", tmp / "marks"
    inject.mkdir()
    marks_dir.mkdir()
    (inject / "sitecustomize.py").write_text(MARKS)
    repo = args.repo
    cmd = one_step_command(
        repo,
        repo / "configs/accelerate/fsdp2.yaml",
        repo / "configs/smollm2-135m/lora.yaml",
        tmp,
        tmp / "run",
        "--main_process_port",
        str(free_port()),
    )
    cmd += [
        f"model.path={model_dir}",
        "model.dtype=float32",
        f"data.max_seq_len={args.seq_len}",
        f"data.cache_dir={tmp / 'stores'}",
        "logging.peak_flops=1e11",  # spares the start-up matmul measurement
        *args.set,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{inject}{os.pathsep}{args.repo}",
        "FSDP_MEMORY_MARKS": str(marks_dir),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    samples, pids = [], {}
    start = time.time()
    with open(tmp / "launch.log", "w") as launch_log:
        proc = subprocess.Popen(cmd, stdout=launch_log, stderr=subprocess.STDOUT, cwd=args.repo, env=env)
        while proc.poll() is None:
            if len(pids) < 2:
                pids = {rank: lines[0][1] for rank, lines in read_marks(marks_dir).items() if lines}
            now = time.time()
            for rank, pid in pids.items():
                kb = rss_anon_kb(pid)
                if kb is not None:
                    samples.append((now, rank, kb))
            if now - start > args.timeout:
                proc.kill()
            time.sleep(args.interval)
    if proc.returncode != 0:
        raise SystemExit((tmp / "launch.log").read_text()[-4000:])
    return samples, read_marks(marks_dir), start


def phase_at(marks: list[tuple[float, int, str]], t: float) -> str:
    return next((phase for when, _, phase in reversed(marks) if when <= t), "startup")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (a multiple of 64: heads of 64)")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (1536 and 24: 745M parameters, 2.98 GB)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 8/3 of hidden, rounded up to 256)")
    p.add_argument("--seq-len", type=int, default=128, help="data.max_seq_len")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an ftscale config override (repeatable)")
    p.add_argument("--repo", type=Path, default=REPO, help="the ftscale checkout to run (its launch/, configs/, ftscale/)")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    p.add_argument("--timeline", type=Path, help="also write every sample here (JSON lines: t, rank, rss_anon_gb, phase)")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args()
    args.repo = args.repo.resolve()
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as folder:
        tmp = Path(folder)
        sizes = build_model(tmp / "model", args.hidden, args.layers, args.intermediate)
        samples, marks, start = run(tmp, args, tmp / "model")
    shard, layer = sizes["model"] / 2, sizes["layer"]
    model = {
        "model": f"random Llama, {sizes['params'] / 1e6:.0f}M parameters, hidden {args.hidden}, {args.layers} layers, untied, fp32",
        "model_gb": round(sizes["model"] / GB, 3),
        "embedding_gb": round(sizes["embedding"] / GB, 3),
        "layer_gb": round(layer / GB, 3),
        "shard_gb": round(shard / GB, 3),
        "ideal_gb": round((shard + layer) / GB, 3),  # above the memory held before loading
        "checkout": str(args.repo),
    }
    timeline = []
    for rank in sorted(marks):
        mine = [(t, kb * 1024 / GB, phase_at(marks[rank], t)) for t, r, kb in samples if r == rank]
        timeline += [{"t": round(t - start, 3), "rank": rank, "rss_anon_gb": round(gb, 3), "phase": phase} for t, gb, phase in mine]
        loading_starts = next(t for t, _, phase in marks[rank] if phase == "loading")
        before = max((gb for t, gb, _ in mine if t <= loading_starts), default=0.0)
        t_peak, peak, phase = max(mine, key=lambda s: s[1])
        by_phase = {}
        for _, gb, ph in mine:
            by_phase[ph] = max(by_phase.get(ph, 0.0), gb)
        print(
            json.dumps(
                {
                    "rank": rank,
                    "peak_rss_anon_gb": round(peak, 3),
                    "peak_phase": phase,
                    "peak_at_s": round(t_peak - start, 2),
                    "loading_peak_gb": round(by_phase.get("loading", 0.0), 3),
                    "training_peak_gb": round(by_phase.get("training", 0.0), 3),
                    "peak_by_phase_gb": {k: round(v, 3) for k, v in by_phase.items()},
                    "before_loading_gb": round(before, 3),
                    "peak_above_before_loading_gb": round(peak - before, 3),
                    "peak_above_before_loading_over_ideal": round((peak - before) * GB / (shard + layer), 2),
                    "samples": len(mine),
                    **model,
                }
            )
        )
    if args.timeline:
        args.timeline.write_text("".join(json.dumps(s) + "\n" for s in sorted(timeline, key=lambda s: s["t"])))


if __name__ == "__main__":
    main()
