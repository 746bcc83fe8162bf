"""`trainer_state.json`: where training stands, the part of a checkpoint that is neither tensors nor config."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ftscale.checkpoint.layout import TRAINER_STATE, CheckpointError


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data position after `step`: epoch ...
    sample_offset: int = 0  # ... and rows of it trained on (the order within an epoch is a seeded permutation)
    rows_per_step: int = 0  # micro_batch_size x processes x gradient_accumulation_steps
    world_size: int = 1  # processes that wrote it
    num_train_rows: int = 0  # the training data's identity as far as the data order needs it
    history: list[dict[str, float]] = field(default_factory=list)  # one record of train metrics per step
    eval_loss_before: float | None = None  # held-out loss before training (None without held-out data)
    tokens_seen: float = 0.0  # input tokens of every step so far, all ranks (a float, as checkpoints have it)
    run_id: str | None = None  # the run that wrote it (CheckpointStore.start); None in checkpoints from before ids

    # Keys a checkpoint must have to resume; the others were added later or are informational.
    REQUIRED = ("step", "rows_per_step", "num_train_rows", "history", "eval_loss_before", "tokens_seen")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, data, where: str) -> TrainerState:
        """The state a checkpoint's trainer_state.json holds; `where` names the checkpoint in errors."""
        missing = [k for k in cls.REQUIRED if not isinstance(data, dict) or k not in data]
        if missing:
            raise CheckpointError(f"{where}: {TRAINER_STATE} lacks {', '.join(missing)}: not written by this ftscale")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
