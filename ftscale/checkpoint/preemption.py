"""Turn SIGUSR1/SIGTERM into "finish this step, checkpoint, exit for requeue".

The handler only sets a flag: the training loop notices it between steps, all ranks agree on it, a checkpoint is
written and the process exits with REQUEUE_EXIT_CODE. A second signal while saving sets the same flag again and
interrupts nothing, so it cannot corrupt the checkpoint."""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again". Launchers that do not pass child exit codes
# through (accelerate launch exits 1 for any failure) can read the PREEMPTED marker in the checkpoint folder.
REQUEUE_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised by the recipe after the preemption checkpoint is complete."""

    def __init__(self, step: int, signal_name: str, checkpoint: str):
        super().__init__(f"{signal_name} received: stopped after step {step}, checkpoint {checkpoint}; exit {REQUEUE_EXIT_CODE} to requeue")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class PreemptionWatcher:
    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.received: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
