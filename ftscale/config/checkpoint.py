"""`checkpoint:` when training state is written and what a run resumes from."""

from pydantic import Field

from ftscale.config.base import Section


class CheckpointConfig(Section):
    dir: str | None = Field(None, description="Folder of step checkpoints (default: <training.output_dir>/checkpoints).")
    every_steps: int | None = Field(None, gt=0, description="Save every N optimizer steps (null: not by step count).")
    every_minutes: float | None = Field(
        None, gt=0, description="Save when this many minutes passed since the last save (null: not by time)."
    )
    keep_last: int = Field(3, gt=0, description="Keep the newest N complete checkpoints (the one resumed from is never deleted).")
    resume: str = Field("auto", description="auto: newest complete checkpoint if any; none: start fresh; or a checkpoint folder.")
    verify_checksums: bool = Field(True, description="Check every file's sha256 against the manifest before loading.")
    save_final_adapter: bool = Field(True, description="Write the trained adapter to <output_dir>/adapter at the end.")
