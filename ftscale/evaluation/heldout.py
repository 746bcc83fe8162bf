"""Token-weighted held-out loss, the one definition the recipe's evaluation and `ftscale compare` share."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ftscale.data.packing import Row


@torch.no_grad()
def summed_loss(model, rows: list[Row], collate: Callable[[list[Row]], dict], device: torch.device) -> tuple[float, int]:
    """(summed token loss, loss tokens) of one batch of rows, batched by `collate`: summed over batches (and
    ranks), their ratio is the token-weighted mean, which a mean of per-batch means is not."""
    batch = collate(rows)
    count = sum(r.loss_tokens for r in rows)
    loss = model(**{n: v.to(device) for n, v in batch.items()}, use_cache=False).loss.item()
    return loss * count, count
