"""The training loss with the output head applied only where a label is: for chat data trained on the answers
about half the positions, and the head (vocabulary x hidden) is a large share of a small model's FLOPs.

transformers' causal LMs take `logits_to_keep` (here a boolean mask of positions) and project only those hidden
states; the loss is then the same token-mean cross-entropy the model computes from `labels`, without the logits
and their backward at every other position."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftscale.data.tokenize import IGNORE_INDEX


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: the mask of positions whose next token carries a label."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def loss_on_labelled_positions(model, inputs: dict[str, torch.Tensor], loss_tokens: int) -> torch.Tensor:
    """Mean cross-entropy over the `loss_tokens` labelled positions (counted on the host from the rows, so reading
    the count does not wait for the device)."""
    labels = inputs.pop("labels")
    keep = labelled_positions(labels)
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="sum") / max(loss_tokens, 1)
