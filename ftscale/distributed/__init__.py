"""Backend specifics that Accelerate leaves to the training code (DeepSpeed ZeRO configuration and gathering)."""
