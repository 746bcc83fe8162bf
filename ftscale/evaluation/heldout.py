"""Token-weighted held-out loss, the one definition the recipe's evaluation and `ftscale compare` share."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ftscale.data.packing import Row
from ftscale.training.loss import LossFunction, model_loss


@torch.no_grad()
def summed_loss(
    model, rows: list[Row], collate: Callable[[list[Row]], dict], device: torch.device, loss: LossFunction = model_loss
) -> tuple[float, int]:
    """(summed token loss, loss tokens) of one batch of rows, batched by `collate`: summed over batches (and
    ranks), their ratio is the token-weighted mean, which a mean of per-batch means is not. `loss`: one of
    ftscale.training.loss's, the same value for less compute where the head runs at labelled positions only."""
    batch = {n: v.to(device) for n, v in collate(rows).items()}
    count = sum(r.loss_tokens for r in rows)
    return loss(model, batch, count).item() * count, count
