"""`data:` where examples come from, how they are rendered, tokenised, cached, mixed and batched."""

from typing import Literal

from pydantic import Field, model_validator

from ftscale.config.base import Section

DataFormat = Literal["auto", "messages", "prompt_completion", "text", "alpaca"]


class DataSource(Section):
    path: str = Field(description="A .jsonl/.json/.parquet/.csv file, a `datasets.save_to_disk` folder, or a hub dataset name.")
    format: DataFormat = Field("auto", description="Row format; auto detects it from the row's keys.")
    split: str = Field("train", description="Split to read from a DatasetDict folder or hub dataset.")
    weight: float | None = Field(
        None,
        gt=0,
        description="Share of this source in the training stream (relative to the other sources' weights; "
        "over- or under-sampled with a seeded generator). Unset on every source: each is used once per epoch.",
    )


class DataConfig(Section):
    train: list[DataSource] = Field(
        default_factory=list, description="Training sources, mixed by their weights (required: a run without them stops and says so)."
    )
    eval: list[DataSource] = Field(default_factory=list, description="Held-out sources for eval loss (empty: no eval metrics).")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Also hold out this fraction of the training examples for eval (a seeded split; 0: none)."
    )
    max_seq_len: int = Field(512, gt=8, description="Longest tokenised example (and packed row) in tokens.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with an example longer than max_seq_len; both are counted."
    )
    packing: bool = Field(True, description="Pack several examples per row without cross-example attention.")
    packer: Literal["best_fit", "greedy"] = Field(
        "best_fit",
        description="best_fit: best-fit-decreasing over seeded shuffle windows (rows ~98% full); greedy: in file order "
        "(what ftscale did before 0.2; resume a run started then with it).",
    )
    pack_window: int = Field(20000, ge=1, description="Examples per best_fit window: larger fills rows better, smaller mixes more.")
    padding_free: bool = Field(
        False,
        description="Concatenate each micro-batch's rows into one row with restarting positions, so no pad token is "
        "computed (flash-attention varlen on CUDA, a block-diagonal mask elsewhere).",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss: assistant replies only, or every token."
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A malformed row stops loading (raise) or is skipped and counted (skip)."
    )
    cache_dir: str = Field(
        ".cache/ftscale/data",
        description="Token stores (tokenised sources, memory-mapped, keyed by their content and settings); "
        "put it on a file system all nodes share to tokenize once per cluster.",
    )
    num_workers: int | None = Field(
        None, ge=0, description="Processes that tokenize while a store is built (unset: the cores available; 0: in process)."
    )

    @model_validator(mode="after")
    def _weights_on_all_or_none(self):
        weighted = [s.weight is not None for s in self.train]
        if any(weighted) and not all(weighted):
            missing = ", ".join(s.path for s in self.train if s.weight is None)
            raise ValueError(f"data.train: weight is set on some sources but not on {missing}: set it on every training source or none")
        if any(s.weight is not None for s in self.eval):
            raise ValueError("data.eval: weight only applies to training sources; remove it from the eval sources")
        return self
