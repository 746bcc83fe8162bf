"""The training loss with the output head applied only where a label is: for chat data trained on the answers
about half the positions, and the head (vocabulary x hidden) is a large share of a small model's FLOPs.

transformers' causal LMs take `logits_to_keep` (here a boolean mask of positions) and project only those hidden
states; the loss is then the same token-mean cross-entropy the model computes from `labels`, without the logits
and their backward at every other position."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ftscale.data.tokenize import IGNORE_INDEX
from ftscale.model.loading import causal_lm


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: the mask of positions whose next token carries a label."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def supports_labelled_head(model: torch.nn.Module) -> bool:
    """Whether the model's forward projects a boolean `logits_to_keep` mask of positions (transformers'
    slice_logits_to_keep, in its causal LMs since 5.x); remote-code and older models may not."""
    inner = causal_lm(model)
    try:
        return inner is not None and "slice_logits_to_keep" in inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        return False


def loss_on_labelled_positions(model, inputs: dict[str, torch.Tensor], loss_tokens: int) -> torch.Tensor:
    """Mean cross-entropy over the `loss_tokens` labelled positions (counted on the host from the rows, so reading
    the count does not wait for the device). The model's own loss for any batch with a labelled token; a batch
    without one gives 0 (the model's own gives NaN), which the recipe scales by its 0 tokens anyway."""
    labels = inputs.pop("labels")
    keep = labelled_positions(labels)
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="sum") / max(loss_tokens, 1)
