"""Rows from examples: which examples share a row (packing), and the tensors of a micro-batch (collate).

Packing works on example lengths only (about 2 s per million examples at start-up, on every rank) and the
stores need not change when it does. `best_fit_rows` is best-fit decreasing over windows of a seeded shuffle: on instruction
data with log-normally spread lengths rows come out over 95% full, where in-order greedy packing leaves about a
fifth of each row to padding (tests/test_token_store.py, bench/data_pipeline.py)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ftscale.data.tokenize import IGNORE_INDEX, count_loss_tokens


@dataclass(frozen=True)
class Row:
    """One training row: one example (padded batching) or several (packing). int64 arrays of one length."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray  # restart at 0 at each packed example: the attention kernel isolates examples by them

    @cached_property  # a frozen dataclass still has an instance __dict__ for it; counted once per row
    def loss_tokens(self) -> int:
        return count_loss_tokens(self.labels)


def greedy_rows(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Row boundaries (row r is examples bounds[r]:bounds[r+1]) packing the examples in the given order."""
    bounds, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used and used + n > max_len:
            bounds.append(i)
            used = 0
        used += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


def best_fit_rows(lengths: np.ndarray, max_len: int, seed: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds): examples reordered so that row r is order[bounds[r]:bounds[r+1]].

    The examples are shuffled with `seed`; each window of `window` of them is packed best-fit decreasing (longest
    first, each into the fullest row it fits). Deterministic for a seed, whatever the number of processes."""
    if len(lengths) and lengths.max() > max_len:
        raise ValueError(f"an example of {lengths.max()} tokens cannot be packed into rows of {max_len}")
    shuffled = np.random.default_rng(seed).permutation(len(lengths))
    order, sizes = [], []
    for start in range(0, len(shuffled), window):
        part = shuffled[start : start + window]
        part = part[np.argsort(-lengths[part], kind="stable")]
        rows: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (space left, row) of the rows that can still take something, sorted
        for i, n in zip(part.tolist(), lengths[part].tolist(), strict=True):
            k = bisect.bisect_left(free, (n, -1))
            if k < len(free):
                space, r = free.pop(k)
                rows[r].append(i)
            else:
                space, r = max_len, len(rows)
                rows.append([i])
            if space - n:
                bisect.insort(free, (space - n, r))
        for members in rows:
            order += members
            sizes.append(len(members))
    return np.asarray(order, dtype=np.int64), np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


def packed_row(examples: list[tuple[np.ndarray, np.ndarray]], packed: bool) -> Row:
    """A row from (ids, loss mask) pairs. Packed rows mask the first label of every example: the model shifts
    labels, and that token would otherwise be predicted from the previous example."""
    ids = np.concatenate([ids for ids, _ in examples])
    labels = np.where(np.concatenate([mask for _, mask in examples]), ids, IGNORE_INDEX)
    positions = np.concatenate([np.arange(len(ids)) for ids, _ in examples])
    if packed:
        labels[positions == 0] = IGNORE_INDEX
    return Row(ids, labels, positions)


def collate(rows: list[Row], pad_id: int, packed: bool, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """The batch tensors of a micro-batch.

    Padded: rows right-padded to the longest. Packed batches carry position_ids and no attention_mask:
    transformers then builds the block-diagonal mask (or flash-attention's varlen path) from the position
    restarts; padding forms a block of its own. Padding-free: the rows concatenated into one, no padding at all."""
    if padding_free:
        ids = np.concatenate([r.input_ids for r in rows])
        labels = np.concatenate([r.labels for r in rows])
        positions = np.concatenate([r.position_ids for r in rows])
        labels[np.cumsum([0] + [len(r.input_ids) for r in rows[:-1]])] = IGNORE_INDEX  # not predicted across rows
        return {
            "input_ids": torch.from_numpy(ids)[None],
            "labels": torch.from_numpy(labels)[None],
            "position_ids": torch.from_numpy(positions)[None],
        }
    width = max(len(r.input_ids) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for k, r in enumerate(rows):
        n = len(r.input_ids)
        ids[k, :n], labels[k, :n], positions[k, :n], mask[k, :n] = r.input_ids, r.labels, r.position_ids, 1
        positions[k, n:] = np.arange(width - n)
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    if packed:
        batch["position_ids"] = torch.from_numpy(positions)
    else:
        batch["attention_mask"] = torch.from_numpy(mask)
    return batch
