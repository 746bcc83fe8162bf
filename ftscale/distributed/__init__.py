"""Backend specifics that Accelerate leaves to the training code: launch checks, FSDP2 sharding, DeepSpeed ZeRO
configuration, and loading the base from rank 0."""
