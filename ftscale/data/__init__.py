"""Data pipeline: read rows, normalise formats, tokenise with loss masks, pack or pad."""

from ftscale.data.dataset import (
    DataStats,
    build_datasets,
    build_rows,
    describe,
    tokenize_sources,
)
from ftscale.data.packing import Row, collate, pack_examples
from ftscale.data.sampler import StepSampler
from ftscale.data.sources import DataError
from ftscale.data.tokenize import IGNORE_INDEX, ensure_chat_template, ensure_pad_token

__all__ = [
    "DataError",
    "DataStats",
    "IGNORE_INDEX",
    "Row",
    "StepSampler",
    "build_datasets",
    "build_rows",
    "describe",
    "collate",
    "ensure_chat_template",
    "ensure_pad_token",
    "pack_examples",
    "tokenize_sources",
]
