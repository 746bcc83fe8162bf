"""`data:` where examples come from, how they are rendered, tokenised and batched."""

from typing import Literal

from pydantic import Field

from ftscale.config.base import Section

DataFormat = Literal["auto", "messages", "prompt_completion", "text", "alpaca"]


class DataSource(Section):
    path: str = Field(description="A .jsonl/.json/.parquet/.csv file, a `datasets.save_to_disk` folder, or a hub dataset name.")
    format: DataFormat = Field("auto", description="Row format; auto detects it from the row's keys.")
    split: str = Field("train", description="Split to read from a DatasetDict folder or hub dataset.")


class DataConfig(Section):
    train: list[DataSource] = Field(
        default_factory=list, description="Training sources, concatenated (required: a run without them stops and says so)."
    )
    eval: list[DataSource] = Field(default_factory=list, description="Held-out sources for eval loss (empty: no eval metrics).")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Also hold out this fraction of the training examples for eval (a seeded split; 0: none)."
    )
    max_seq_len: int = Field(512, gt=8, description="Longest tokenised example (and packed row) in tokens.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with an example longer than max_seq_len; both are counted."
    )
    packing: bool = Field(True, description="Pack several examples per row without cross-example attention (padding-free).")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss: assistant replies only, or every token."
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A malformed row stops loading (raise) or is skipped and counted (skip)."
    )
