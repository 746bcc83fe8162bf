"""Token-weighted held-out loss, the one definition the recipe's evaluation and `ftscale compare` share."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ftscale.data.packing import Row
from ftscale.training.loss import loss_on_labelled_positions


@torch.no_grad()
def summed_loss(
    model, rows: list[Row], collate: Callable[[list[Row]], dict], device: torch.device, labelled_head: bool = False
) -> tuple[float, int]:
    """(summed token loss, loss tokens) of one batch of rows, batched by `collate`: summed over batches (and
    ranks), their ratio is the token-weighted mean, which a mean of per-batch means is not. `labelled_head`: the
    head only at labelled positions (ftscale.training.loss), the same loss for less compute."""
    batch = {n: v.to(device) for n, v in collate(rows).items()}
    count = sum(r.loss_tokens for r in rows)
    loss = loss_on_labelled_positions(model, batch, count) if labelled_head else model(**batch, use_cache=False).loss
    return loss.item() * count, count
