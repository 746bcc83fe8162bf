"""Token-weighted held-out loss, the one definition the recipe's evaluation and `ftscale compare` share."""

from __future__ import annotations

import torch

from ftscale.data.packing import Row, collate


@torch.no_grad()
def summed_loss(model, rows: list[Row], pad_id: int, packed: bool, device: torch.device) -> tuple[float, int]:
    """(summed token loss, loss tokens) of one batch of rows: summed over batches (and ranks), their ratio is the
    token-weighted mean, which a mean of per-batch means is not."""
    batch = collate(rows, pad_id, packed)
    count = sum(r.loss_tokens for r in rows)
    loss = model(**{n: v.to(device) for n, v in batch.items()}, use_cache=False).loss.item()
    return loss * count, count
