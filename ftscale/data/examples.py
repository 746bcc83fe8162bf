"""Source rows -> admitted tokenized examples, a chunk at a time, with counts of what was skipped, truncated or
dropped. The same function runs in the store builder's worker processes and in process (`ftscale compare`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ftscale.config.data import DataConfig, DataFormat
from ftscale.data.formats import to_example
from ftscale.data.sources import DataError, SourceRow
from ftscale.data.tokenize import Encoded, encode_examples

KEPT_SKIP_REASONS = 5  # the first few skipped rows are named in the log; the rest are counted


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

    def add(self, other: DataStats) -> None:
        for name in ("examples", "skipped", "truncated", "dropped", "no_loss", "tokens", "loss_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped_where += other.skipped_where[: KEPT_SKIP_REASONS - len(self.skipped_where)]

    def to_json(self) -> dict:
        return dict(self.__dict__)


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


@dataclass
class TokenizedChunk:
    """Admitted examples of a chunk of rows, concatenated: what a worker sends back and a store appends."""

    ids: np.ndarray  # uint32, every example's tokens one after another
    loss_mask: np.ndarray  # uint8, 1 where the token carries loss
    lengths: np.ndarray  # int64, tokens per example
    loss_tokens: np.ndarray  # int64, loss tokens per example (the first label never counts)
    stats: DataStats

    def examples(self) -> list[Encoded]:
        if not len(self.lengths):
            return []
        cuts = np.cumsum(self.lengths)[:-1]
        return [
            Encoded(i.astype(np.int64), m.astype(bool))
            for i, m in zip(np.split(self.ids, cuts), np.split(self.loss_mask, cuts), strict=True)
        ]


def _admit(enc: Encoded, cfg: DataConfig, stats: DataStats) -> Encoded | None:
    if len(enc.ids) > cfg.max_seq_len:
        if cfg.overlong == "drop":
            stats.dropped += 1
            return None
        stats.truncated += 1
        enc = Encoded(enc.ids[: cfg.max_seq_len], enc.loss_mask[: cfg.max_seq_len])
    if enc.loss_tokens == 0:
        stats.no_loss += 1  # e.g. truncation cut off the whole reply
        return None
    return enc


def _skip_or_raise(e: DataError, cfg: DataConfig, stats: DataStats) -> None:
    if cfg.on_error == "raise":
        raise DataError(f"{e}\n  (set data.on_error=skip to skip malformed rows and count them)") from None
    stats.skipped += 1
    if len(stats.skipped_where) < KEPT_SKIP_REASONS:
        stats.skipped_where.append(str(e))


def tokenize_chunk(items: list[SourceRow], fmt: DataFormat, cfg: DataConfig, tokenizer) -> TokenizedChunk:
    """Parse, validate, render, tokenize and admit a chunk of one source's rows, in order. A bad row raises its
    file:line DataError (data.on_error=raise) or is counted (skip)."""
    stats, examples, wheres = DataStats(), [], []
    parsed: list[DataError | None] = []  # per row in order: its error, or None when it became the next example
    for item in items:
        try:
            examples.append(to_example(item.parse(), fmt, item.where))
            wheres.append(item.where)
            parsed.append(None)
        except DataError as e:
            parsed.append(e)
    encoded = iter(encode_examples(examples, tokenizer, cfg.train_on, wheres))
    kept: list[Encoded] = []
    for error in parsed:  # in file order, so the first bad row is the one reported
        enc = error or next(encoded)
        if isinstance(enc, DataError):
            _skip_or_raise(enc, cfg, stats)
        elif (enc := _admit(enc, cfg, stats)) is not None:
            kept.append(enc)
    lengths = np.array([len(e.ids) for e in kept], dtype=np.int64)
    loss = np.array([e.loss_tokens for e in kept], dtype=np.int64)
    stats.examples, stats.tokens, stats.loss_tokens = len(kept), int(lengths.sum()), int(loss.sum())
    return TokenizedChunk(
        np.concatenate([e.ids for e in kept]).astype(np.uint32) if kept else np.zeros(0, np.uint32),
        np.concatenate([e.loss_mask for e in kept]).astype(np.uint8) if kept else np.zeros(0, np.uint8),
        lengths,
        loss,
        stats,
    )
