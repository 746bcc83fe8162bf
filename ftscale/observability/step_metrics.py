"""One optimizer step's figures from every rank in one all-reduce, and the logging window they add up to.

Why by hand: the figures are sums (loss, tokens), per-rank values whose maximum and minimum matter (step time,
memory, a straggler) and checkpoint triggers. A sum all-reduce carries them all at once when each rank writes its
per-rank values into its own slot of the vector: the result holds every rank's value, at 8 bytes per rank and value."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ftscale.data.sampler import StepTotals
from ftscale.observability.flops import ModelFlops
from ftscale.observability.memory import device_memory_bytes, host_rss_bytes

GB = 1e9
PER_RANK = ("compute_s", "data_wait_s", "host_rss", "device_peak", "device_reserved")


@dataclass
class LocalStep:
    """What this rank measured in one optimizer step. The loss figures stay on the device until the all-reduce,
    so no micro-batch waits for the host."""

    loss_sum: torch.Tensor  # sum over micro-batches of (mean token loss x loss tokens)
    nonfinite: torch.Tensor  # micro-batches whose loss was NaN or infinite
    batch_tokens: int  # input_ids elements of the micro-batches, padding included
    data_wait_s: float  # reading rows and collating them
    grad_norm: float | None
    compute_s: float = 0.0  # the whole step on this rank, before the all-reduce


@dataclass
class ReducedStep:
    loss_sum: float
    nonfinite: int
    batch_tokens: int
    preempted: bool
    timed: bool
    per_rank: dict[str, np.ndarray]  # PER_RANK name -> one value per rank


def reduce_step(local: LocalStep, triggers: tuple[bool, bool], rank: int, world: int, device: torch.device, all_reduce) -> ReducedStep:
    """Sum every rank's figures in one all-reduce (`all_reduce`: a float64 tensor -> its sum over ranks)."""
    slots = torch.zeros(len(PER_RANK), world, dtype=torch.float64)
    slots[:, rank] = torch.tensor([local.compute_s, local.data_wait_s, host_rss_bytes(), *device_memory_bytes(device)], dtype=torch.float64)
    host = torch.cat([torch.tensor([local.batch_tokens, *triggers], dtype=torch.float64), slots.flatten()])
    on_device = torch.stack([local.loss_sum.double(), local.nonfinite.double()])
    values = all_reduce(torch.cat([on_device, host.to(on_device.device)])).tolist()
    loss_sum, nonfinite, batch_tokens, preempted, timed = values[:5]
    per_rank = np.asarray(values[5:]).reshape(len(PER_RANK), world)
    return ReducedStep(loss_sum, int(nonfinite), int(batch_tokens), preempted > 0, timed > 0, dict(zip(PER_RANK, per_rank, strict=True)))


@dataclass
class MetricsWindow:
    """Adds up the steps since the last log line; `record()` turns them into that line's metrics and starts over.
    Rates are over training time only: evaluation and checkpoint time are counted apart."""

    flops: ModelFlops
    peak_flops: float  # all devices together
    world: int
    steps_per_epoch: int
    examples_seen: int
    _sums: dict[str, float] = field(default_factory=dict)
    _rank_sums: dict[str, np.ndarray] = field(default_factory=dict)
    _rank_max: dict[str, np.ndarray] = field(default_factory=dict)
    _grad_norms: list[float] = field(default_factory=list)
    _lr: float = 0.0

    def _add(self, key: str, value: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value

    def add_step(self, step: ReducedStep, totals: StepTotals, wall_s: float, lr: float, grad_norm: float | None) -> None:
        self.examples_seen += totals.examples
        for key, value in (
            ("steps", 1),
            ("train_s", wall_s),
            ("loss_sum", step.loss_sum),
            ("loss_tokens", totals.loss_tokens),
            ("tokens", totals.tokens),
            ("examples", totals.examples),
            ("batch_tokens", step.batch_tokens),
            ("flops", self.flops.step(totals.tokens, totals.loss_tokens, totals.attention_context)),
            ("flops_6n", self.flops.step(totals.tokens, totals.loss_tokens, totals.attention_context, six_n=True)),
            ("nonfinite_losses", step.nonfinite),
            ("data_wait_s", float(step.per_rank["data_wait_s"].max())),
        ):
            self._add(key, value)
        self._rank_sums["compute_s"] = self._rank_sums.get("compute_s", 0) + step.per_rank["compute_s"]
        for key in ("host_rss", "device_peak", "device_reserved"):
            self._rank_max[key] = np.maximum(self._rank_max.get(key, 0), step.per_rank[key])
        self._lr = lr
        if grad_norm is not None:
            self._grad_norms.append(grad_norm)

    def add_time(self, kind: str, seconds: float) -> None:
        """Time outside training steps: kind is "eval", "checkpoint" or "logging" (writing the previous line)."""
        self._add(f"{kind}_s", seconds)

    def record(self, step: int) -> dict[str, float]:
        """The metrics of the steps added since the last record (only times when there were none, e.g. at step 0)."""
        s, out = self._sums, {}
        if s.get("steps"):
            n, train_s = s["steps"], s["train_s"]
            per_rank = self._rank_sums["compute_s"] / n
            norms = self._grad_norms
            out = {
                "train/loss": s["loss_sum"] / s["loss_tokens"] if s["loss_tokens"] else float("nan"),
                "train/lr": self._lr,
                "train/grad_norm": sum(norms) / len(norms) if norms else None,
                "train/step_time_s": train_s / n,
                "perf/tokens_per_s": s["tokens"] / train_s,
                "perf/tokens_per_s_per_device": s["tokens"] / train_s / self.world,
                "perf/loss_tokens_per_s": s["loss_tokens"] / train_s,
                "perf/samples_per_s": s["examples"] / train_s,
                "perf/padding_fraction": 1 - s["tokens"] / s["batch_tokens"] if s["batch_tokens"] else 0.0,
                "perf/mfu": s["flops"] / train_s / self.peak_flops,
                "perf/mfu_6n": s["flops_6n"] / train_s / self.peak_flops,
                "data/wait_s": s["data_wait_s"] / n,
                "time/data_wait_s": s["data_wait_s"],
                "data/epoch": step / self.steps_per_epoch,
                "data/examples_seen": self.examples_seen,
                "health/step_time_slowest_s": float(per_rank.max()),
                "health/step_time_fastest_s": float(per_rank.min()),
                "health/slowest_rank": int(per_rank.argmax()),
                "health/nonfinite_losses": int(s["nonfinite_losses"]),
                "health/nonfinite_grad_norms": sum(1 for g in norms if not np.isfinite(g)),
                "mem/host_rss_gb": float(self._rank_max["host_rss"].max()) / GB,
                "mem/host_rss_rank": int(self._rank_max["host_rss"].argmax()),
            }
            if self._rank_max["device_reserved"].max() > 0:  # CUDA
                out["mem/device_max_allocated_gb"] = float(self._rank_max["device_peak"].max()) / GB
                out["mem/device_reserved_gb"] = float(self._rank_max["device_reserved"].max()) / GB
            out["time/train_s"] = train_s
        for kind in ("eval", "checkpoint", "logging"):
            out[f"time/{kind}_s"] = s.get(f"{kind}_s", 0.0)
        self._sums, self._rank_sums, self._rank_max, self._grad_norms = {}, {}, {}, []
        return out


class Stopwatch:
    """Seconds since start(), with the device's queued work finished first (CUDA runs asynchronously)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.began = time.perf_counter()

    def start(self) -> None:
        self.began = time.perf_counter()

    def elapsed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.began
