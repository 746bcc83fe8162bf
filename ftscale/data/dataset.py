"""Build the tokenised training/eval rows of a recipe, with counts of what was skipped, truncated or dropped."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ftscale.config.data import DataConfig, DataSource
from ftscale.data.formats import to_example
from ftscale.data.packing import Row, pack_examples, single_rows
from ftscale.data.sources import DataError, read_rows
from ftscale.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example

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
            if all(label == IGNORE_INDEX for label in ex.labels[1:]):
                stats.no_loss += 1  # e.g. truncation cut off the whole reply
                continue
            stats.examples += 1
            stats.tokens += len(ex.input_ids)
            stats.loss_tokens += sum(label != IGNORE_INDEX for label in ex.labels[1:])
            out.append(ex)
    if stats.skipped:
        log.warning("skipped %d malformed rows; first: %s", stats.skipped, stats.skipped_where[0])
    return out, stats


def build_rows(sources: list[DataSource], cfg: DataConfig, tokenizer, what: str) -> tuple[list[Row], DataStats]:
    examples, stats = tokenize_sources(sources, cfg, tokenizer)
    if not examples:
        names = ", ".join(s.path for s in sources)
        raise DataError(f"{what} dataset is empty after loading {names} ({stats})")
    rows = pack_examples(examples, cfg.max_seq_len) if cfg.packing else single_rows(examples)
    return rows, stats
