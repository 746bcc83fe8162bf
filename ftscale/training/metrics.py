"""Progress on the console and metrics to Weights & Biases, from the main process only."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ftscale.checkpoint.layout import WANDB_RUN_ID
from ftscale.config import FtscaleConfig

log = logging.getLogger("ftscale")


class MetricLogger:
    """`run_id` is the run's identity from the checkpoint store (CheckpointStore.start): a resumed run keeps it and
    so continues its W&B run; a fresh run in the same output folder has a new one and starts a new W&B run."""

    def __init__(self, cfg: FtscaleConfig, is_main: bool, total_steps: int, run_id: str):
        self.cfg, self.is_main, self.total = cfg, is_main, total_steps
        self.start = time.monotonic()
        self.run = None
        wb = cfg.logging.wandb
        if is_main and wb.mode != "disabled":
            import wandb

            out = Path(wb.dir or cfg.training.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=wb.project,
                name=wb.run_name or Path(cfg.training.output_dir).name,
                dir=str(out),
                mode=wb.mode,
                config=cfg.model_dump(mode="json"),
                id=run_id,
                resume="allow",  # a fresh run has a new id, so only a resumed run continues one
            )
            (Path(cfg.training.output_dir) / WANDB_RUN_ID).write_text(run_id)  # for `wandb sync` and scripts

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """Log the metrics that have a value (None: not measured in this run, e.g. eval without eval data)."""
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if not self.is_main or not metrics:
            return
        if self.run is not None:
            self.run.log(metrics, step=step)
        if self.cfg.logging.console:
            elapsed = time.monotonic() - self.start
            eta = elapsed / max(step, 1) * (self.total - step)
            shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            log.info("step %d/%d  %s  elapsed=%ds eta=%ds", step, self.total, shown, elapsed, eta)

    def finish(self, summary: dict[str, float]) -> None:
        if self.run is not None:
            self.run.summary.update(summary)
            self.close()

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
