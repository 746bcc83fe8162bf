"""Batch tokenised examples: padding-free packing (several examples per row) or plain padding."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ftscale.data.tokenize import IGNORE_INDEX, TokenizedExample, count_loss_tokens


@dataclass(frozen=True)
class Row:
    """One training row: one example (padded batching) or several (packing)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]  # restart at 0 at each packed example: the attention kernel isolates examples by them

    @cached_property  # a frozen dataclass still has an instance __dict__ for it; counted once per row
    def loss_tokens(self) -> int:
        return count_loss_tokens(self.labels)


def pack_examples(examples: list[TokenizedExample], max_len: int) -> list[Row]:
    """Greedy in-order packing into rows of at most `max_len` tokens.

    In order (not best-fit) so the data order stays the one the sampler chose. The first label of every example
    is masked: the model shifts labels, and that token would otherwise be predicted from the previous example."""
    rows: list[Row] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_len:
            rows.append(Row(ids, labels, pos))
            ids, labels, pos = [], [], []
        ids += ex.input_ids
        labels += [IGNORE_INDEX] + ex.labels[1:]
        pos += list(range(len(ex.input_ids)))
    if ids:
        rows.append(Row(ids, labels, pos))
    return rows


def single_rows(examples: list[TokenizedExample]) -> list[Row]:
    return [Row(ex.input_ids, ex.labels, list(range(len(ex.input_ids)))) for ex in examples]


def collate(rows: list[Row], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest in the batch.

    Packed batches carry position_ids and no attention_mask: transformers then builds the block-diagonal mask
    (or flash-attention's varlen path) from the position restarts; padding forms a block of its own."""
    width = max(len(r.input_ids) for r in rows)
    ids, labels, pos, mask = [], [], [], []
    for r in rows:
        pad = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * pad)
        labels.append(r.labels + [IGNORE_INDEX] * pad)
        pos.append(r.position_ids + list(range(pad)))
        mask.append([1] * len(r.input_ids) + [0] * pad)
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if packed:
        batch["position_ids"] = torch.tensor(pos)
    else:
        batch["attention_mask"] = torch.tensor(mask)
    return batch
