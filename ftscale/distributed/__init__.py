"""Everything backend-specific: launch settings, the `Backend` interface and its implementations (DDP / one
process, FSDP2, DeepSpeed ZeRO), loading the base from rank 0, and the checks a launch must pass."""
