"""`ftscale preprocess`: build a recipe's token stores ahead of training (on a login node, say) and report on them."""

from __future__ import annotations

import time

from ftscale.config import FtscaleConfig
from ftscale.data.dataset import build_datasets
from ftscale.data.packing import greedy_rows
from ftscale.data.rows import per_example
from ftscale.data.store_build import ensure_store, request_for
from ftscale.data.token_store import TokenStore
from ftscale.model.loading import load_tokenizer


def preprocess(cfg: FtscaleConfig) -> dict:
    """Build (or verify) every source's store; the statistics of each and of the training rows they make."""
    tokenizer, _ = load_tokenizer(cfg.model)
    sources = []
    named = [("train", s) for s in cfg.data.train] + [("eval", s) for s in cfg.data.eval]
    requests = [request_for(source, cfg.data, tokenizer) for _, source in named]  # every key before any build
    for (what, source), request in zip(named, requests, strict=True):
        start = time.monotonic()
        built = ensure_store(request, cfg.data, tokenizer)
        store = TokenStore(request.folder)
        sources.append(
            {
                "split": what,
                "path": source.path,
                "store": str(request.folder),
                "built": built,
                "seconds": round(time.monotonic() - start, 2),
                **store.stats,
                "length_histogram": store.manifest["length_histogram"],
            }
        )
    data = build_datasets(cfg.data, tokenizer, cfg.training.seed)
    train = data.train
    greedy = greedy_rows(per_example(train.stores, "lengths", train.examples), cfg.data.max_seq_len)
    return {
        "sources": sources,
        "train": {
            "examples": int(len(train.examples)),
            "rows": len(train),
            "tokens": train.tokens,
            "packing": cfg.data.packer if cfg.data.packing else "none",
            "fill": round(train.fill(cfg.data.max_seq_len), 4),
            "greedy_fill": round(train.tokens / ((len(greedy) - 1) * cfg.data.max_seq_len), 4),
            "mixture": data.mixture,
        },
        "eval_rows": len(data.eval) if data.eval else 0,
    }


def format_report(report: dict) -> str:
    lines = []
    for s in report["sources"]:
        lines.append(f"{s['split']} {s['path']}: {'built' if s['built'] else 'ready'} in {s['seconds']} s -> {s['store']}")
        lines.append(
            f"  {s['examples']} examples, {s['tokens']} tokens ({s['loss_tokens']} with loss); truncated {s['truncated']}, "
            f"dropped {s['dropped']}, no loss {s['no_loss']}, skipped {s['skipped']}"
        )
        lines.append("  lengths: " + ", ".join(f"{k}: {v}" for k, v in s["length_histogram"].items()))
    t = report["train"]
    lines.append(
        f"training: {t['examples']} examples in {t['rows']} rows, packing {t['packing']}: {100 * t['fill']:.1f}% full "
        f"(in-order greedy packing: {100 * t['greedy_fill']:.1f}%); {report['eval_rows']} held-out rows"
    )
    lines += [f"  mix: {m}" for m in t["mixture"]]
    return "\n".join(lines)
