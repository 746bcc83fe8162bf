"""The data order: which rows each rank trains on at each optimizer step.

The global order is a seeded permutation per epoch; micro-batch k of a step is a contiguous slice of it, split by
rank. So N processes with batch B see exactly the rows one process with batch N*B sees, and a step number alone
fixes the data position: (epoch, offset) is all a checkpoint needs to resume it exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ftscale.data.packing import Row
from ftscale.data.rows import StoreRows


@dataclass(frozen=True)
class StepTotals:
    """An optimizer step's data on all ranks."""

    tokens: int  # real tokens, padding excluded
    loss_tokens: int
    examples: int
    attention_context: int  # sum over tokens of their causal context within their own example


class StepSampler:
    def __init__(self, rows: StoreRows, micro_batch_size: int, accumulation_steps: int, rank: int, world: int, seed: int):
        self.rows, self.micro, self.accumulation, self.rank, self.world, self.seed = (
            rows,
            micro_batch_size,
            accumulation_steps,
            rank,
            world,
            seed,
        )
        self.rows_per_step = micro_batch_size * world * accumulation_steps
        self.steps_per_epoch = len(rows) // self.rows_per_step
        self._order = np.zeros(0, np.int64)  # this epoch's permutation, drawn once per epoch (8 bytes a row)
        self._order_epoch: int | None = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, rows of that epoch already trained on) after `step` optimizer steps."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return epoch, index * self.rows_per_step

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()

    def _step_order(self, step: int) -> np.ndarray:
        """The row indices of optimizer step `step` (0-based), all ranks and micro-batches, in order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self._epoch_order(epoch), epoch
        return self._order[index * self.rows_per_step : (index + 1) * self.rows_per_step]

    def micro_batches(self, step: int) -> list[list[Row]]:
        """This rank's micro-batches (lists of rows) for optimizer step `step`."""
        order, per_micro = self._step_order(step), self.micro * self.world
        return [
            [self.rows[i] for i in order[k * per_micro + self.rank * self.micro : k * per_micro + (self.rank + 1) * self.micro]]
            for k in range(self.accumulation)
        ]

    def step_totals(self, step: int) -> StepTotals:
        """The step's real tokens, loss tokens, examples and attention context on all ranks: every rank holds every
        row, so neither the gradient's normalisation by loss tokens nor the step's metrics need a collective."""
        order, rows = self._step_order(step), self.rows
        return StepTotals(
            int(rows.row_tokens[order].sum()),
            int(rows.loss_tokens[order].sum()),
            int(rows.row_examples[order].sum()),
            int(rows.row_context[order].sum()),
        )

    def examples_before(self, step: int) -> int:
        """Examples trained on in the first `step` optimizer steps (rows per step are fixed, examples per row not)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        full = self.steps_per_epoch * self.rows_per_step
        seen = 0
        for e in range(epoch + 1):
            seen += int(self.rows.row_examples[self._epoch_order(e)[: full if e < epoch else index * self.rows_per_step]].sum())
        return seen

    def resume_problem(self, rows_per_step: int, num_rows: int) -> str | None:
        """Why a checkpoint written with `rows_per_step` rows per step over `num_rows` rows cannot continue this data
        order, or None when it can."""
        if rows_per_step != self.rows_per_step:
            return (
                f"written with {rows_per_step} rows per optimizer step (micro_batch_size x processes x "
                f"gradient_accumulation_steps), this run has {self.rows_per_step}. Keep the global batch: with "
                f"{self.world} processes set micro_batch_size x gradient_accumulation_steps = {rows_per_step / self.world:g}"
            )
        if num_rows != len(self.rows):
            return (
                f"the training data had {num_rows} rows, now {len(self.rows)}: the data changed (a run started before "
                "ftscale 0.2 packed greedily: resume it with data.packer=greedy)"
            )
        return None
