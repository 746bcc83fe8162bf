"""Build the tokenised training/eval rows of a recipe, with counts of what was skipped, truncated or dropped."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ftscale.config.data import DataConfig, DataSource
from ftscale.data.formats import to_example
from ftscale.data.packing import Row, pack_examples, single_rows
from ftscale.data.sources import DataError, read_rows
from ftscale.data.tokenize import TokenizedExample, tokenize_example

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    examples: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped: int = 0
    no_loss: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    skipped_where: list[str] = field(default_factory=list)


def tokenize_sources(sources: list[DataSource], cfg: DataConfig, tokenizer) -> tuple[list[TokenizedExample], DataStats]:
    stats = DataStats()
    out: list[TokenizedExample] = []
    for source in sources:
        for item in read_rows(source):
            try:
                if isinstance(item.row, DataError):
                    raise item.row
                ex = tokenize_example(to_example(item.row, source.format, item.where), tokenizer, cfg.train_on, item.where)
            except DataError as e:
                if cfg.on_error == "raise":
                    raise DataError(f"{e}\n  (set data.on_error=skip to skip malformed rows and count them)") from None
                stats.skipped += 1
                stats.skipped_where.append(str(e))
                continue
            if len(ex.input_ids) > cfg.max_seq_len:
                if cfg.overlong == "drop":
                    stats.dropped += 1
                    continue
                stats.truncated += 1
                ex = TokenizedExample(ex.input_ids[: cfg.max_seq_len], ex.labels[: cfg.max_seq_len])
            if ex.loss_tokens == 0:
                stats.no_loss += 1  # e.g. truncation cut off the whole reply
                continue
            stats.examples += 1
            stats.tokens += len(ex.input_ids)
            stats.loss_tokens += ex.loss_tokens
            out.append(ex)
    if stats.skipped:
        log.warning("skipped %d malformed rows; first: %s", stats.skipped, stats.skipped_where[0])
    return out, stats


def describe(stats: DataStats) -> str:
    """The counts in words, for logs and errors."""
    parts = [f"{stats.examples} usable examples ({stats.tokens} tokens, {stats.loss_tokens} with loss)"]
    for count, what in (
        (stats.skipped, "malformed rows skipped"),
        (stats.truncated, "truncated to data.max_seq_len"),
        (stats.dropped, "dropped as longer than data.max_seq_len"),
        (stats.no_loss, "dropped with no token to learn from"),
    ):
        if count:
            parts.append(f"{count} {what}")
    return ", ".join(parts)


def _rows(examples: list[TokenizedExample], cfg: DataConfig) -> list[Row]:
    return pack_examples(examples, cfg.max_seq_len) if cfg.packing else single_rows(examples)


def _no_examples(what: str, sources: list[DataSource], stats: DataStats, detail: str = "") -> DataError:
    names = ", ".join(s.path for s in sources)
    return DataError(f"the {what} data has no usable example after reading {names}: {describe(stats)}{detail}")


def build_rows(sources: list[DataSource], cfg: DataConfig, tokenizer, what: str) -> tuple[list[Row], DataStats]:
    examples, stats = tokenize_sources(sources, cfg, tokenizer)
    if not examples:
        raise _no_examples(what, sources, stats)
    return _rows(examples, cfg), stats


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[Row], list[Row], DataStats]:
    """Training rows, held-out rows (data.eval plus a seeded data.eval_fraction of the training examples; may be
    empty) and the training data's counts."""
    if not cfg.train:
        raise DataError(
            "no training data: set data.train to your files, e.g. `data: {train: [{path: my.jsonl}]}` in the config "
            "or the override data.train=[{path: my.jsonl}] (.jsonl, .json, .parquet, .csv or a datasets folder)"
        )
    examples, stats = tokenize_sources(cfg.train, cfg, tokenizer)
    held_out: list[TokenizedExample] = []
    if cfg.eval_fraction and examples:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        n = max(1, round(cfg.eval_fraction * len(examples)))
        chosen = set(order[:n])
        held_out = [ex for i, ex in enumerate(examples) if i in chosen]
        examples = [ex for i, ex in enumerate(examples) if i not in chosen]
    if not examples:
        held = f"; data.eval_fraction={cfg.eval_fraction} held out all {len(held_out)} of them" if held_out else ""
        raise _no_examples("training", cfg.train, stats, held)
    eval_rows = build_rows(cfg.eval, cfg, tokenizer, "eval")[0] if cfg.eval else []
    eval_rows += _rows(held_out, cfg) if held_out else []
    return _rows(examples, cfg), eval_rows, stats
