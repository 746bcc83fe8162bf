"""Streaming merge of adapters into their base: tensor by tensor, into size-limited safetensors shards."""

from ftscale.merge.adapter_edits import MergeError, read_adapter_edits
from ftscale.merge.stream_merge import parse_size, stream_merge
from ftscale.merge.verify import verify_merge

__all__ = ["MergeError", "parse_size", "read_adapter_edits", "stream_merge", "verify_merge"]
