"""Training and held-out rows as index ranges into token stores: O(examples) memory whatever the token count."""

from __future__ import annotations

import numpy as np

from ftscale.data.packing import Row, packed_row
from ftscale.data.token_store import TokenStore


def per_example(stores: list[TokenStore], name: str, examples: np.ndarray) -> np.ndarray:
    """A per-example array of the stores (`lengths` or `loss_tokens`) for `examples`, numbered across `stores`."""
    return np.concatenate([getattr(s, name) for s in stores] + [np.zeros(0, np.int64)])[examples]


class StoreRows:
    """Row r holds the examples `examples[bounds[r]:bounds[r+1]]`, numbered across `stores` in order (store 0's
    examples first). A row's tokens are read from the stores' memory maps when it is indexed."""

    def __init__(self, stores: list[TokenStore], examples: np.ndarray, bounds: np.ndarray, packed: bool):
        self.stores, self.examples, self.bounds, self.packed = stores, examples, bounds, packed
        self._starts = np.cumsum([0] + [len(s) for s in stores])
        loss = per_example(stores, "loss_tokens", examples)
        self.loss_tokens = np.add.reduceat(loss, bounds[:-1]) if len(examples) else np.zeros(0, np.int64)
        self.tokens = int(per_example(stores, "lengths", examples).sum())

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, r: int | slice) -> Row | list[Row]:
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        if not 0 <= r < len(self):
            raise IndexError(r)
        parts = []
        for g in self.examples[self.bounds[r] : self.bounds[r + 1]].tolist():
            s = int(np.searchsorted(self._starts, g, side="right")) - 1
            parts.append(self.stores[s].encoded(g - int(self._starts[s])))
        return packed_row(parts, self.packed)

    def fill(self, max_len: int) -> float:
        """Tokens over row capacity: the fraction of a full-width row that is not padding."""
        return self.tokens / (len(self) * max_len) if len(self) else 0.0
