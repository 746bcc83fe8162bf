"""`training.activation_offloading`: the tensors forward saves for backward are kept in (pinned) host memory and
brought back to the device when backward needs them, so a micro-batch's activations no longer occupy the GPU.

Written on torch's saved-tensor hooks rather than taken from `torch.autograd.graph.save_on_cpu` because that
moves every saved tensor, weights included (a linear layer saves `weight.t()`, a view of its Parameter): each
frozen weight would cross to the host and back on every micro-batch, and under FSDP each gathered layer would be
held on the host. Here a tensor that views a Parameter, or spans under 1 MiB, stays where it is; the others are
moved as the span of storage they address (an expanded view keeps its small span) and rebuilt with their own
strides, or as their own elements where the span is more than twice those (a slice of a fused buffer), once per
tensor however many ops save it. Weights cast afresh by autocast would not be recognised as weights: the config
refuses offloading with fp32 weights under half-precision autocast. Copies to the host are synchronous, as save_on_cpu's are;
copies back are asynchronous from pinned memory. Not done: overlapping the copies with compute on a side stream
(torchtune's OffloadActivations does)."""

from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
from torch import nn

SMALLEST_OFFLOADED = 2**20  # storage bytes: below this the copy costs more than the memory is worth


def views_a_parameter(tensor: torch.Tensor) -> bool:
    while tensor is not None:
        if isinstance(tensor, nn.Parameter):
            return True
        tensor = tensor._base
    return False


def plain_dense(tensor: torch.Tensor) -> bool:
    """A tensor whose bytes are its values: not a subclass (DTensor, 4-bit weights), sparse, quantized, conjugate or
    negated view, nor without data."""
    return (
        type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.device.type != "meta"
        and tensor.numel() > 0
    )


class Offloaded(NamedTuple):
    device: torch.device
    host: torch.Tensor  # bytes: the storage the tensor addresses from its first element to its last, or its own
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...] | None  # None: contiguous


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, smallest: int = SMALLEST_OFFLOADED) -> None:
        self.smallest = smallest
        self.offloaded_bytes = 0  # what this context moved to the host
        # Tensors already moved, by id: several ops save the same tensor. The weak reference tells a live tensor
        # from a later one that reuses a freed one's id.
        self._moved: dict[int, tuple[weakref.ref, Offloaded]] = {}
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | Offloaded:
        key = (id(tensor), tensor._version)  # the version: a tensor changed in place since is saved anew
        moved = self._moved.get(key)
        if moved is not None and moved[0]() is tensor:
            return moved[1]
        if not plain_dense(tensor) or views_a_parameter(tensor):
            return tensor.detach()  # detached: a saved output holding its own grad_fn would make a reference cycle
        first = tensor.storage_offset()
        last = first + sum((n - 1) * step for n, step in zip(tensor.size(), tensor.stride(), strict=True))
        size = tensor.element_size()
        span, own = (last + 1 - first) * size, tensor.numel() * size
        if min(span, own) < self.smallest:
            return tensor.detach()
        if span > 2 * own:  # a slice of a larger buffer (a fused projection's q, k or v): its own elements only
            source, stride = tensor.detach().contiguous().view(torch.uint8).flatten(), None
        else:  # its span, so an expanded view stays small and the strides stay the tensor's
            storage = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
            source, stride = storage[first * size : (last + 1) * size], tensor.stride()
        host = torch.empty(source.numel(), dtype=torch.uint8, pin_memory=torch.cuda.is_available()).copy_(source)
        self.offloaded_bytes += host.numel()
        packed = Offloaded(tensor.device, host, tensor.dtype, tensor.size(), stride)
        self._moved[key] = (weakref.ref(tensor), packed)
        return packed

    @staticmethod
    def _unpack(packed: torch.Tensor | Offloaded) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        storage = packed.host.to(packed.device, non_blocking=True).untyped_storage()
        stride = packed.stride if packed.stride is not None else torch.empty(packed.size, device="meta").stride()
        return torch.empty(0, dtype=packed.dtype, device=packed.device).set_(storage, 0, packed.size, stride)


def saved_activations(offload: bool) -> contextlib.AbstractContextManager:
    """The context a micro-batch's forward runs in: offloading its saved tensors, or leaving them be."""
    return ActivationOffload() if offload else contextlib.nullcontext()
