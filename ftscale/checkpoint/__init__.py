"""Training checkpoints: sharded adapter + optimizer state, atomic, exactly resumable, preemption-safe."""

from ftscale.checkpoint.export import export_adapter
from ftscale.checkpoint.layout import (
    PREEMPTED,
    Checkpoint,
    CheckpointError,
    complete_checkpoints,
    verify,
)
from ftscale.checkpoint.preemption import (
    REQUEUE_EXIT_CODE,
    Preempted,
    PreemptionWatcher,
)
from ftscale.checkpoint.store import CheckpointStore
from ftscale.checkpoint.trainer_state import TrainerState

__all__ = [
    "PREEMPTED",
    "REQUEUE_EXIT_CODE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "Preempted",
    "PreemptionWatcher",
    "TrainerState",
    "complete_checkpoints",
    "export_adapter",
    "verify",
]
