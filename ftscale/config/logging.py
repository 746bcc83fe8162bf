"""`logging:` console progress and Weights & Biases."""

from typing import Literal

from pydantic import Field

from ftscale.config.base import Section


class WandbSection(Section):
    mode: Literal["disabled", "offline", "online"] = Field(
        "disabled", description="online streams to W&B; offline writes files to sync later (`wandb sync`); disabled logs nothing."
    )
    project: str = Field("ftscale", description="W&B project name.")
    run_name: str | None = Field(None, description="Run name (default: the output folder's name).")
    dir: str | None = Field(None, description="Folder for W&B files (default: the run's output_dir).")


class LoggingConfig(Section):
    console: bool = Field(True, description="Print a progress line every training.log_every steps on the main process.")
    level: Literal["info", "debug"] = Field("info", description="Log detail; debug adds each checkpoint phase (writing, renaming).")
    wandb: WandbSection = Field(default_factory=WandbSection, description="Weights & Biases settings.")
