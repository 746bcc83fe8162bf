"""`checkpoint:` when training state is written and what a run resumes from."""

from pydantic import Field

from ftscale.config.base import Section


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, gt=0, description="Save a checkpoint every N optimizer steps (null: only at the end).")
    save_final_adapter: bool = Field(True, description="Write the trained adapter to <output_dir>/adapter at the end.")
