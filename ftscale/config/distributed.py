"""`distributed:` settings that Accelerate's launch config does not carry."""

from pydantic import Field

from ftscale.config.base import Section


class DistributedConfig(Section):
    collective_timeout_s: int = Field(1800, gt=0, description="Seconds a collective may wait before the job fails instead of hanging.")
    zero3_persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3 keeps parameters below this many elements whole on every rank (null: DeepSpeed's default, 1e5)."
    )
