"""What a run reports while it trains: the step's metrics (one all-reduce), FLOPs and MFU, memory, and where they
go (metrics.jsonl, W&B, the console); `ftscale report` draws them afterwards."""
