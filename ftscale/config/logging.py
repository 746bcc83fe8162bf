"""`logging:` console progress, metrics.jsonl, Weights & Biases and the peak used for MFU."""

from typing import Literal

from pydantic import Field

from ftscale.config.base import Section


class WandbSection(Section):
    mode: Literal["disabled", "offline", "online"] = Field(
        "disabled", description="online streams to W&B; offline writes files to sync later (`wandb sync`); disabled logs nothing."
    )
    project: str = Field("ftscale", description="W&B project name.")
    entity: str | None = Field(None, description="W&B team or user that owns the run (default: the API key's default entity).")
    run_name: str | None = Field(None, description="Run name (default: the output folder's name).")
    group: str | None = Field(None, description="Groups runs in the W&B UI, e.g. one sweep or one experiment.")
    tags: list[str] = Field(default_factory=list, description="Tags on the W&B run, for filtering.")
    notes: str | None = Field(None, description="Free text shown with the run.")
    dir: str | None = Field(None, description="Folder for W&B files (default: the run's output_dir).")
    log_adapter: bool = Field(False, description="Upload the final adapter folder as a W&B artifact of type 'model'.")


class LoggingConfig(Section):
    console: bool = Field(
        True, description="Progress on the main process: a bar on a terminal, a line every training.log_every steps otherwise."
    )
    level: Literal["info", "debug"] = Field("info", description="Log detail; debug adds each checkpoint phase (writing, renaming).")
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s of one device for perf/mfu (default: a table of known GPUs; on CPU a matmul measured at start-up).",
    )
    wandb: WandbSection = Field(default_factory=WandbSection, description="Weights & Biases settings.")
