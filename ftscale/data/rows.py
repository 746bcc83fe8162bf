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
        lengths = per_example(stores, "lengths", examples).astype(np.int64)
        # Per row: loss tokens (the step's normalisation), and for the step's metrics real tokens, examples and the
        # causal attention context summed over tokens (n(n+1)/2 per example: packing is not credited across examples).
        self.loss_tokens = self._per_row(per_example(stores, "loss_tokens", examples))
        self.row_tokens = self._per_row(lengths)
        self.row_examples = np.diff(bounds)
        self.row_context = self._per_row(lengths * (lengths + 1) // 2)
        self.tokens = int(lengths.sum())

    def _per_row(self, per_example_values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(per_example_values, self.bounds[:-1]) if len(self.examples) else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, r: int | slice) -> Row | list[Row]:
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        if not 0 <= r < len(self):
            raise IndexError(r)
        return packed_row([self.example(j) for j in range(self.bounds[r], self.bounds[r + 1])], self.packed)

    def example(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, loss mask) of the j-th example of these rows, in row order."""
        g = int(self.examples[j])
        s = int(np.searchsorted(self._starts, g, side="right")) - 1
        return self.stores[s].encoded(g - int(self._starts[s]))

    def fill(self, max_len: int) -> float:
        """Tokens over row capacity: the fraction of a full-width row that is not padding."""
        return self.tokens / (len(self) * max_len) if len(self) else 0.0
