"""The training loss, computed only where it is needed.

- The output head (vocabulary x hidden, about a third of a small model's FLOPs) runs only at positions whose next
  token has a label: transformers' causal LMs take `logits_to_keep` as a boolean mask of positions and project only
  those hidden states. For chat data trained on the answers that is about half the positions.
- The head and the cross-entropy then run in chunks of positions (`training.loss_chunk_size`), so the fp32 logits of
  the whole micro-batch never exist at once. Written by hand because no library does it for every device: Liger's
  fused linear cross-entropy (used instead where `model.liger_kernels` is on) is a Triton kernel for GPUs only.

Each loss is the same token-mean cross-entropy the model computes from `labels`."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ftscale.config import PROMPT_METHODS
from ftscale.data.tokenize import IGNORE_INDEX
from ftscale.model.loading import causal_lm

# The chunked loss projects the head itself, so it is used only where the model's forward takes the head's output as
# the logits unchanged: `logits = self.lm_head(...)` alone on its line, and no later `logits = ...logits...` (Gemma's
# soft-capping, Cohere's, Granite's and Falcon-H1's scaling all have one or the other).
_HEAD_LINE = re.compile(r"^\s*logits\s*=\s*self\.lm_head\((?:[^()]|\([^()]*\))*\)\s*$")
_LOGITS_CHANGED = re.compile(r"^\s*logits\s+=\s+.*\blogits\b")  # an assignment (a keyword argument has no spaces)


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: the mask of positions whose next token carries a label."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def _forward_source(model: nn.Module) -> str:
    inner = causal_lm(model)
    try:
        return inspect.getsource(type(inner).forward) if inner is not None else ""
    except (OSError, TypeError):
        return ""


def supports_labelled_head(model: nn.Module) -> bool:
    """Whether the model's forward projects a boolean `logits_to_keep` mask of positions (transformers'
    slice_logits_to_keep, in its causal LMs since 5.x); remote-code and older models may not."""
    return "slice_logits_to_keep" in _forward_source(model)


def _logits_are_the_head_output(source: str) -> bool:
    lines = source.splitlines()
    at = [i for i, line in enumerate(lines) if "self.lm_head(" in line]
    return len(at) == 1 and bool(_HEAD_LINE.match(lines[at[0]])) and not any(_LOGITS_CHANGED.match(line) for line in lines[at[0] + 1 :])


def chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The output head, where the chunked loss can stand in for it: a frozen plain linear layer (not an adapter's
    wrapper, not trained) whose output the model uses as the logits unchanged."""
    inner = causal_lm(model)
    head = inner.get_output_embeddings() if inner is not None else None
    plain = isinstance(head, nn.Linear) and not any(isinstance(m, nn.Linear) and m is not head for m in head.modules())
    if not plain or any(p.requires_grad for p in head.parameters()) or not _logits_are_the_head_output(_forward_source(model)):
        return None
    return head


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, a chunk of positions at a time. The gradient
    for the hidden states is computed in forward, chunk by chunk (softmax minus one-hot, times the weight), so
    neither pass keeps logits: the memory is one chunk's logits, and the FLOPs those of the unchunked head."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # cast the (fp32, for QLoRA) head once, not twice per chunk
            weight = weight.to(torch.get_autocast_dtype(device))
            bias = None if bias is None else bias.to(weight.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            log_probs = torch.log_softmax(F.linear(h, weight, bias), -1, dtype=torch.float32)  # one kernel, not five
            total -= log_probs.gather(1, t[:, None]).sum()
            probs = log_probs.exp_()  # in place: the chunk's log-probabilities become its softmax
            probs[torch.arange(len(t), device=t.device), t] -= 1
            grad[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def linear_cross_entropy(
    head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int, fused: Callable | None = None
) -> torch.Tensor:
    """Summed cross-entropy of the frozen `head` applied to `hidden` (positions x hidden size) against `targets`;
    `fused` is Liger's fused linear cross-entropy where it is in use (it has no kernel for an empty input)."""
    if fused is not None and len(targets):
        return fused(hidden, head.weight, targets, bias=head.bias, reduction="sum").float()
    return _ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)


class ChunkedHeadLoss:
    """The loss at labelled positions with the head's work done by `linear_cross_entropy`. A hook before the head
    takes its input (the labelled hidden states, gathered by the model's own `logits_to_keep` code) and hands the
    head an empty batch instead, so the model's forward, its adapters and any backend's hooks on the head (sharded
    weights are gathered for its forward) stay as they are. Outside this loss (evaluation, generation) the head
    runs as usual."""

    def __init__(self, head: nn.Linear, chunk: int, fused: Callable | None = None):
        self.chunk, self.fused = chunk, fused
        self._targets: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self.hook = head.register_forward_pre_hook(self._before_head)  # for the model's lifetime: it is inert outside this loss

    def _before_head(self, head: nn.Module, args: tuple) -> tuple | None:
        if self._targets is None:
            return None
        hidden, targets, self._targets = args[0], self._targets, None
        self._loss = linear_cross_entropy(head, hidden, targets, self.chunk, self.fused)
        return (hidden[:0], *args[1:])

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor], loss_tokens: int) -> torch.Tensor:
        labels = inputs.pop("labels")
        keep = labelled_positions(labels)
        self._targets = labels[:, 1:][keep[:, :-1]]
        try:
            model(**inputs, use_cache=False, logits_to_keep=keep)
            loss = self._loss
        finally:
            self._targets = self._loss = None
        if loss is None:
            raise RuntimeError("the output head did not run in the model's forward: set training.loss_chunk_size: null")
        return loss / max(loss_tokens, 1)


def loss_on_labelled_positions(model, inputs: dict[str, torch.Tensor], loss_tokens: int) -> torch.Tensor:
    """Mean cross-entropy over the `loss_tokens` labelled positions (counted on the host from the rows, so reading
    the count does not wait for the device). The model's own loss for any batch with a labelled token; a batch
    without one gives 0 (the model's own gives NaN), which the recipe scales by its 0 tokens anyway."""
    labels = inputs.pop("labels")
    keep = labelled_positions(labels)
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="sum") / max(loss_tokens, 1)


def model_loss(model, inputs: dict[str, torch.Tensor], loss_tokens: int) -> torch.Tensor:
    """The model's own loss from `labels`: the head at every position (prompt methods, models without the mask)."""
    return model(**inputs, use_cache=False).loss


LossFunction = Callable[[nn.Module, dict[str, torch.Tensor], int], torch.Tensor]


def training_loss(
    model: nn.Module, training, method: str, fused: Callable | None = None, chunks_allowed: bool = True
) -> tuple[LossFunction, str]:
    """The loss the recipe calls as `loss(model, inputs, loss_tokens)` for this model and `training:` section, and
    a line for the log saying which. Built after the backend has wrapped the model: its hooks on the head (a
    sharded weight gathered for the forward) must run before the chunked loss's. `chunks_allowed`: the backend
    lets a hook hand the head an empty batch."""
    if not training.head_on_labels_only or method in PROMPT_METHODS:  # prompt methods change the sequence in peft
        return model_loss, "the model's own, the head at every position"
    if not supports_labelled_head(model):
        return model_loss, f"the model's own, the head at every position ({type(causal_lm(model)).__name__} takes no mask of positions)"
    head = chunkable_head(model) if chunks_allowed else None
    if head is None or (training.loss_chunk_size is None and fused is None):
        return loss_on_labelled_positions, "the head at labelled positions only, in one piece"
    chunk = training.loss_chunk_size or 2**62
    how = "Liger's fused linear cross-entropy" if fused is not None else f"in chunks of {training.loss_chunk_size} positions"
    return ChunkedHeadLoss(head, chunk, fused), f"the head at labelled positions only, {how}"
