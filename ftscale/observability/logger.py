"""Where the main process sends each logged step: metrics.jsonl (always), W&B (unless disabled), the console."""

from __future__ import annotations

from pathlib import Path

from ftscale.config import FtscaleConfig
from ftscale.observability.console import ConsoleProgress
from ftscale.observability.metrics_file import METRICS_FILE, MetricsFile
from ftscale.observability.wandb_run import log_adapter, start_run


class MetricLogger:
    """Every method is a no-op on other ranks. `resumed_step` (None for a fresh run) trims metrics.jsonl back to it."""

    def __init__(
        self, cfg: FtscaleConfig, is_main: bool, total_steps: int, start_step: int, run_id: str, resumed_step: int | None, info: dict
    ):
        self.cfg, self.run_id = cfg, run_id
        self.file = self.run = self.console = None
        if not is_main:
            return
        self.file = MetricsFile(Path(cfg.training.output_dir) / METRICS_FILE, resumed_step)
        if cfg.logging.wandb.mode != "disabled":
            self.run = start_run(cfg, run_id, info)
        if cfg.logging.console:
            self.console = ConsoleProgress(total_steps, start_step)

    def step_done(self) -> None:
        if self.console is not None:
            self.console.step_done()

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """Log the metrics that have a value (None: not measured in this run, e.g. a gradient norm without clipping)."""
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if self.file is None or not metrics:
            return
        self.file.write(step, metrics)
        if self.run is not None:
            self.run.log(metrics, step=step)
        if self.console is not None:
            self.console.show(step, metrics)

    def log_adapter(self, folder: Path) -> None:
        if self.run is not None and self.cfg.logging.wandb.log_adapter:
            log_adapter(self.run, folder, self.run_id)

    def finish(self, summary: dict[str, float]) -> None:
        if self.run is not None:
            self.run.summary.update(summary)
        self.close()

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
            self.console = None
        if self.run is not None:
            self.run.finish()
            self.run = None
        if self.file is not None:
            self.file.close()
            self.file = None
