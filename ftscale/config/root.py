"""The whole recipe config and the checks that span several sections."""

from pydantic import Field, model_validator

from ftscale.config.base import Section
from ftscale.config.checkpoint import CheckpointConfig
from ftscale.config.data import DataConfig
from ftscale.config.distributed import DistributedConfig
from ftscale.config.logging import LoggingConfig
from ftscale.config.method import PROMPT_METHODS, MethodConfig
from ftscale.config.model import ModelConfig
from ftscale.config.training import TrainingConfig


class FtscaleConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="PEFT method.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets and batching.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation loop.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Multi-process settings.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Console and W&B.")

    @model_validator(mode="after")
    def _compatible_sections(self):
        name = self.method.name
        if name in PROMPT_METHODS and self.data.packing:
            raise ValueError(
                f"method.name={name} prepends virtual tokens to each example, so rows cannot hold several packed "
                "examples: set data.packing=false"
            )
        if name in PROMPT_METHODS and self.data.padding_free:
            raise ValueError(
                f"method.name={name} prepends virtual tokens to each row, so a micro-batch cannot be one concatenated "
                "row: set data.padding_free=false"
            )
        if name in PROMPT_METHODS and self.training.gradient_checkpointing is True:
            raise ValueError(f"method.name={name} does not support training.gradient_checkpointing in peft: set it to false")
        if name == "qlora" and self.model.dtype == "float16" and self.training.precision == "bf16":
            raise ValueError("model.dtype=float16 with training.precision=bf16 mixes half formats: use bfloat16 for both")
        return self
