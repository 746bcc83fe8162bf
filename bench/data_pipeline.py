"""The data pipeline at scale (issue 12). Prints one JSON line.

    python bench/data_pipeline.py [--conversations 200000] [--workers N] [--baseline-ref REF]

On a synthetic chat set of realistic shape (bench/synthetic_chat.py) and SmolLM2's tokenizer:
- building a token store with 1 worker and with N, in examples/s; and today's pipeline before the store (the
  in-memory one at --baseline-ref, run from a git worktree of that commit) on the same rows, on one core;
- the start-up time of `build_datasets` when the store exists (verification, mixing and packing included);
- the store's size on disk;
- the peak anonymous memory (RssAnon, sampled; memory-mapped store pages are shared page cache, not counted) each
  of 2 ranks adds during data set-up, with the store at ~10M and ~60M tokens and without it (every rank tokenizing
  into Python lists, as before) at ~10M;
- the fill of rows packed greedily in order (before) and best-fit (now)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from synthetic_chat import write_dataset  # noqa: E402

MAX_SEQ_LEN = 2048


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakAnon:
    """The largest RssAnon seen while the block runs, sampled every 20 ms, above what it was at the start."""

    def __enter__(self):
        self.start, self.peak, self._stop = rss_anon(), rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())
        self.added = self.peak - self.start


def config(path: Path, cache: Path, workers: int, **extra):
    from ftscale.config.data import DataConfig, DataSource

    return DataConfig(train=[DataSource(path=str(path))], max_seq_len=MAX_SEQ_LEN, cache_dir=str(cache), num_workers=workers, **extra)


def tokenizer():
    from ftscale.config import load_config
    from ftscale.model.loading import load_tokenizer

    return load_tokenizer(
        load_config(
            str(REPO / "configs/smollm2-135m/lora.yaml"), [f"model.path={REPO / '.cache/ftscale/models/SmolLM2-135M-Instruct'}"]
        ).model
    )[0]


def build(path: Path, cache: Path, workers: int) -> dict:
    from ftscale.data.store_build import ensure_store, request_for
    from ftscale.data.token_store import TokenStore

    cfg, tok = config(path, cache, workers), tokenizer()
    request = request_for(cfg.train[0], cfg, tok)
    start = time.monotonic()
    ensure_store(request, cfg, tok)
    seconds = time.monotonic() - start
    store = TokenStore(request.folder)
    size = sum(p.stat().st_size for p in request.folder.iterdir())
    return {
        "seconds": round(seconds, 1),
        "examples_per_s": round(len(store) / seconds),
        "tokens": store.stats["tokens"],
        "store_bytes": size,
    }


def baseline(path: Path, ref: str, rows: int) -> dict:
    """Today's pipeline before the store, one core: tokenize_sources of that commit, on the first `rows` rows."""
    subset = path.with_name(f"first-{rows}.jsonl")
    with path.open() as f, subset.open("w") as out:
        for _ in range(rows):
            out.write(f.readline())
    tree = Path(tempfile.mkdtemp()) / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True, capture_output=True)
    code = (
        "import time, json\n"
        "from ftscale.config.data import DataConfig, DataSource\n"
        "from ftscale.data import tokenize_sources\n"
        f"from bench_tok import tok\n"
        "start = time.monotonic()\n"
        f"examples, _ = tokenize_sources([DataSource(path={str(subset)!r})], DataConfig(max_seq_len={MAX_SEQ_LEN}), tok)\n"
        "print(json.dumps({'seconds': time.monotonic() - start, 'examples': len(examples)}))\n"
    )
    helper = tree / "bench_tok.py"
    helper.write_text(
        "from ftscale.config import load_config\nfrom ftscale.model.loading import load_tokenizer\n"
        f"tok = load_tokenizer(load_config({str(REPO / 'configs/smollm2-135m/lora.yaml')!r}, "
        f"['model.path={REPO / '.cache/ftscale/models/SmolLM2-135M-Instruct'}']).model)[0]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    try:
        out = subprocess.run(
            ["taskset", "-c", "0", sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True, check=True
        )
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": rows, "seconds": round(result["seconds"], 1), "examples_per_s": round(result["examples"] / result["seconds"])}


def one_core_build(path: Path, cache: Path, rows: int) -> dict:
    """The store build on the same rows as the baseline, in process, on one core."""
    subset = path.with_name(f"first-{rows}.jsonl")
    bench, one_core = str(REPO / "bench"), str(cache / "one-core")
    code = (
        f"import sys, json; sys.path.insert(0, {bench!r})\n"
        "from data_pipeline import build\n"
        "from pathlib import Path\n"
        f"print(json.dumps(build(Path({str(subset)!r}), Path({one_core!r}), 0)))\n"
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rank(rank: int, port: int, path: str, cache: str, with_store: bool, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tok = tokenizer()
    cfg = config(Path(path), Path(cache), 0)
    with PeakAnon() as peak:
        if with_store:
            from ftscale.data import build_datasets

            data = build_datasets(cfg, tok, seed=0, rank=rank)
            rows = len(data.train)
        else:  # before the store: every rank tokenized everything into lists and packed them
            from ftscale.data import tokenize_sources

            examples, _ = tokenize_sources(cfg.train, cfg, tok)
            rows = len(examples)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"added_bytes": peak.added, "rows": rows}))
    dist.destroy_process_group()


def two_rank_startup(path: Path, cache: Path, with_store: bool) -> list[int]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp())
    mp.start_processes(_rank, args=(port, str(path), str(cache), with_store, str(out)), nprocs=2, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text())["added_bytes"] for r in range(2)]


def startup_seconds(path: Path, cache: Path) -> float:
    from ftscale.data import build_datasets

    tok = tokenizer()
    start = time.monotonic()
    build_datasets(config(path, cache, 0), tok, seed=0)
    return round(time.monotonic() - start, 2)


def fills(path: Path, cache: Path) -> dict:
    import numpy as np

    from ftscale.data import build_datasets
    from ftscale.data.packing import greedy_rows

    data = build_datasets(config(path, cache, 0), tokenizer(), seed=0)
    lengths = np.concatenate([s.lengths for s in data.train.stores])  # file order, as the old packer saw them
    greedy = len(greedy_rows(lengths, MAX_SEQ_LEN)) - 1
    return {"greedy_in_order": round(lengths.sum() / (greedy * MAX_SEQ_LEN), 4), "best_fit": round(data.train.fill(MAX_SEQ_LEN), 4)}


def first_tokens(path: Path, target: int, out: Path) -> Path:
    """The first rows of `path` holding about `target` tokens (~4 characters a token for this tokenizer)."""
    chars = 0
    with path.open() as f, out.open("w") as w:
        for line in f:
            if chars >= target * 4.2:
                break
            w.write(line)
            chars += len(line)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--conversations", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--baseline-ref", default="6307823", help="a commit before the token store (today's pipeline)")
    p.add_argument("--baseline-rows", type=int, default=5000)
    args = p.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # in-process building on one core: workers are the only parallelism
    work = Path(tempfile.mkdtemp(prefix="ftscale-data-bench-"))
    data = write_dataset(work / "chat.jsonl", args.conversations)
    cache = work / "cache"
    result = {"bench": "data_pipeline", "conversations": args.conversations, "max_seq_len": MAX_SEQ_LEN}
    result["one_core"] = {
        "before_store": baseline(data, args.baseline_ref, args.baseline_rows),
        "store_build": one_core_build(data, cache, args.baseline_rows),
    }
    result["one_core"]["speedup"] = round(
        result["one_core"]["store_build"]["examples_per_s"] / result["one_core"]["before_store"]["examples_per_s"], 2
    )
    result["build_1_worker"] = build(data, cache / "w1", 1)
    result[f"build_{args.workers}_workers"] = build(data, cache / f"w{args.workers}", args.workers)
    result["cache_hit_startup_s"] = startup_seconds(data, cache / f"w{args.workers}")
    result["store_bytes"] = result[f"build_{args.workers}_workers"]["store_bytes"]
    result["packing_fill"] = fills(data, cache / f"w{args.workers}")
    small, large = first_tokens(data, 10_000_000, work / "10M.jsonl"), first_tokens(data, 60_000_000, work / "60M.jsonl")
    rss = {}
    for name, path in (("10M", small), ("60M", large)):
        build(path, cache / "rss", args.workers)  # built ahead: the figure is a training start-up's
        rss[f"store_{name}_tokens"] = two_rank_startup(path, cache / "rss", with_store=True)
    rss["no_store_10M_tokens"] = two_rank_startup(small, cache / "rss", with_store=False)
    result["rank_peak_anon_bytes"] = rss
    print(json.dumps(result))


if __name__ == "__main__":
    main()
