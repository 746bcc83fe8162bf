"""Weighted mixing of training sources: each source's share of the training stream, whatever its size."""

from __future__ import annotations

import numpy as np

from ftscale.data.sources import DataError


def quotas(total: int, weights: list[float]) -> list[int]:
    """`total` examples split in proportion to `weights`, rounded by largest remainder (they sum to `total`)."""
    shares = np.asarray(weights, dtype=np.float64) / max(weights)  # first to at most 1: huge weights cannot overflow
    exact = shares * total / shares.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts.tolist()


def mix(available: list[np.ndarray], weights: list[float] | None, seed: int, names: list[str]) -> list[np.ndarray]:
    """Per source, the examples (indices from `available`) the training stream holds.

    Without weights every available example once. With weights the stream keeps its natural size (all
    available examples) and source s gets its share of it: whole copies of the source when it is over-sampled,
    then a seeded sample without replacement for the remainder (under-sampling is that sample alone)."""
    if weights is None:
        return available
    rng = np.random.default_rng(seed)
    out = []
    for pool, quota, name in zip(available, quotas(sum(len(a) for a in available), weights), names, strict=True):
        if not len(pool):
            raise DataError(f"{name}: has weight but no usable example to sample (see the counts above)")
        copies, rest = divmod(quota, len(pool))
        out.append(np.concatenate([np.tile(pool, copies), rng.permutation(pool)[:rest]]))
    return out
