"""The rows a recipe trains and evaluates on: token stores for every source (built once, see store_build), the
held-out split, weighted mixing and packing, all on example indices and lengths."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ftscale.config.data import DataConfig, DataSource
from ftscale.data.examples import DataStats, describe
from ftscale.data.mixing import mix
from ftscale.data.packing import best_fit_rows, greedy_rows
from ftscale.data.rows import StoreRows, per_example
from ftscale.data.sources import DataError, read_rows
from ftscale.data.store_build import ensure_store, request_for, tokenized_chunks
from ftscale.data.store_ranks import build_once
from ftscale.data.token_store import MANIFEST, TokenStore
from ftscale.data.tokenize import TokenizedExample

log = logging.getLogger("ftscale")


def tokenize_sources(sources: list[DataSource], cfg: DataConfig, tokenizer) -> tuple[list[TokenizedExample], DataStats]:
    """Every source's admitted examples in memory, in order, without a store: for small files (`ftscale compare`)."""
    stats, out = DataStats(), []
    for source in sources:
        for chunk in tokenized_chunks(read_rows(source), source.format, cfg, tokenizer, workers=0):
            stats.add(chunk.stats)
            out += [TokenizedExample.from_encoded(e) for e in chunk.examples()]
    if stats.skipped:
        log.warning("skipped %d malformed rows; first: %s", stats.skipped, stats.skipped_where[0])
    return out, stats


def open_stores(sources: list[DataSource], cfg: DataConfig, tokenizer, rank: int = 0) -> list[TokenStore]:
    """Each source's token store, built on the builder ranks if it is missing or damaged, then opened on every rank."""
    requests = [request_for(s, cfg, tokenizer) for s in sources]

    def build() -> None:
        for request in requests:
            ensure_store(request, cfg, tokenizer)

    build_once(Path(cfg.cache_dir), [r.folder.name for r in requests], rank, build)
    for r in requests:
        if not (r.folder / MANIFEST).is_file():  # a host that no builder served (its ranks share a name with another)
            raise DataError(f"{r.folder}: the token store of {r.source.path} was not built for rank {rank}: see the builders' logs")
    return [TokenStore(r.folder) for r in requests]


def summed_stats(stores: list[TokenStore]) -> DataStats:
    total = DataStats()
    for store in stores:
        total.add(DataStats(**store.stats))
    return total


def _no_examples(what: str, sources: list[DataSource], stats: DataStats, detail: str = "") -> DataError:
    names = ", ".join(s.path for s in sources)
    return DataError(f"the {what} data has no usable example after reading {names}: {describe(stats)}{detail}")


def _rows(stores: list[TokenStore], stream: np.ndarray, cfg: DataConfig, seed: int) -> StoreRows:
    """Rows over the examples `stream` (numbered across `stores`), packed per data.packer or one per row."""
    lengths = per_example(stores, "lengths", stream)
    if not cfg.packing:
        return StoreRows(stores, stream, np.arange(len(stream) + 1), packed=False)
    if cfg.packer == "greedy":
        return StoreRows(stores, stream, greedy_rows(lengths, cfg.max_seq_len), packed=True)
    order, bounds = best_fit_rows(lengths, cfg.max_seq_len, seed, cfg.pack_window)
    return StoreRows(stores, stream[order], bounds, packed=True)


@dataclass
class Datasets:
    train: StoreRows
    eval: StoreRows | None  # None: no held-out data
    stats: DataStats  # of the training sources
    mixture: list[str]  # per training source: usable examples and how many the training stream holds


def build_datasets(cfg: DataConfig, tokenizer, seed: int, rank: int = 0) -> Datasets:
    """Training rows, held-out rows (data.eval plus a seeded data.eval_fraction of the training examples) and the
    training data's counts."""
    if not cfg.train:
        raise DataError(
            "no training data: set data.train to your files, e.g. `data: {train: [{path: my.jsonl}]}` in the config "
            "or the override data.train=[{path: my.jsonl}] (.jsonl, .json, .parquet, .csv or a datasets folder)"
        )
    stores = open_stores(cfg.train + cfg.eval, cfg, tokenizer, rank)
    train_stores, eval_stores = stores[: len(cfg.train)], stores[len(cfg.train) :]
    stats = summed_stats(train_stores)
    starts = np.cumsum([0] + [len(s) for s in train_stores])
    everything = np.arange(starts[-1])
    held_out = np.zeros(0, np.int64)
    if cfg.eval_fraction and len(everything):
        order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed)).numpy()
        held_out = np.sort(order[: max(1, round(cfg.eval_fraction * len(everything)))])
    available = np.setdiff1d(everything, held_out)
    if not len(available):
        held = f"; data.eval_fraction={cfg.eval_fraction} held out all {len(held_out)} of them" if len(held_out) else ""
        raise _no_examples("training", cfg.train, stats, held)
    per_source = [available[(available >= a) & (available < b)] for a, b in zip(starts, starts[1:], strict=False)]
    weights = [s.weight for s in cfg.train] if cfg.train[0].weight is not None else None
    mixed = mix(per_source, weights, seed, [s.path for s in cfg.train])
    mixture = [
        f"{s.path}: {len(pool)} usable, {len(m)} in the training stream ({len(m) / max(len(pool), 1):.2f}x)"
        for s, pool, m in zip(cfg.train, per_source, mixed, strict=True)
    ]
    train = _rows(train_stores, np.concatenate(mixed), cfg, seed)
    eval_stream = np.concatenate([held_out, starts[-1] + np.arange(sum(len(s) for s in eval_stores))])
    if eval_stores and not sum(len(s) for s in eval_stores):
        raise _no_examples("eval", cfg.eval, summed_stats(eval_stores))
    eval_rows = _rows(stores, eval_stream, cfg, seed) if len(eval_stream) else None
    return Datasets(train, eval_rows, stats, mixture)
