"""Data pipeline: read rows, normalise formats, tokenise with loss masks into token stores, mix, pack or pad."""

from ftscale.data.dataset import Datasets, build_datasets, open_stores, tokenize_sources
from ftscale.data.examples import DataStats, describe
from ftscale.data.packing import Row, collate
from ftscale.data.sampler import StepSampler
from ftscale.data.sources import DataError
from ftscale.data.tokenize import IGNORE_INDEX, ensure_chat_template, ensure_pad_token

__all__ = [
    "DataError",
    "DataStats",
    "Datasets",
    "IGNORE_INDEX",
    "Row",
    "StepSampler",
    "build_datasets",
    "collate",
    "describe",
    "ensure_chat_template",
    "ensure_pad_token",
    "open_stores",
    "tokenize_sources",
]
