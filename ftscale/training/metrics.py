"""Progress on the console and metrics to Weights & Biases, from the main process only."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from ftscale.config import FtscaleConfig

log = logging.getLogger("ftscale")


class MetricLogger:
    def __init__(self, cfg: FtscaleConfig, is_main: bool, total_steps: int):
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
                id=self._run_id(out, cfg.checkpoint.resume != "none"),
                resume="allow",
            )

    @staticmethod
    def _run_id(out: Path, resuming: bool) -> str:
        """The W&B run id, kept in the output folder so a resumed (or requeued) run continues the same W&B run."""
        id_file = out / "wandb-run-id"
        if resuming and id_file.is_file():
            return id_file.read_text().strip()
        run_id = secrets.token_hex(4)  # W&B ids are short lowercase alphanumerics
        id_file.write_text(run_id)
        return run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
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
