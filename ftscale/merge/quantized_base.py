"""Which base weights a QLoRA adapter is merged into: the original ones, or the ones training computed with (each
quantised tensor quantised and dequantised again with the run's own settings, every other floating tensor rounded
through the compute dtype it was loaded in; one tensor at a time).

`dequantized` gives back the model training evaluated (on the CPU with fp32 compute: logits within fp32 rounding of
the 4-bit model + adapter). The default stays `original`, because it measured better: on the SmolLM2-135M QLoRA
demo the merge into the original weights matched more held-out answers in every run (exact match 0.83 vs 0.67,
0.88 vs 0.58, 0.58 vs 0.25) and had the lower held-out loss in three of four, although its logits differ from the
trained model's by up to ~10. Figures and the command in bench/RESULTS.md (`python bench/qlora_merge.py`)."""

from __future__ import annotations

import re

import torch

from ftscale.config.method import BLOCKSIZES
from ftscale.merge.adapter_edits import AdapterEdits, MergeError
from ftscale.model.quantization import DTYPES, QUANT_TYPES, dequantized

BASE_WEIGHTS = ("original", "dequantized")
# Tensors transformers keeps unquantised in a 4-bit model (embeddings and the output head): for adapters without a
# record of the quantised tensors, every other 2-D weight is taken to have been quantised.
NOT_QUANTIZED = re.compile(r".*(embed|wte|wpe|lm_head|word_embeddings|position_embeddings).*")
CHECKS = {
    "quant_type": lambda v: isinstance(v, str) and v in QUANT_TYPES,
    "double_quant": lambda v: isinstance(v, bool),
    "blocksize": lambda v: type(v) is int and v in BLOCKSIZES,
    "compute_dtype": lambda v: isinstance(v, str) and v in ("float32", "bfloat16", "float16"),
    "quant_storage": lambda v: isinstance(v, str) and v in DTYPES,
}
LISTS = ("tensors", "transposed")  # optional in a record: lists of base tensor names


def recorded_settings(edits: AdapterEdits, adapter: str) -> dict | None:
    """The adapter's own quantisation record (ftscale_adapter.json), checked; None when it has none."""
    record = edits.quantization
    if record is None:
        return None
    bad = [k for k, ok in CHECKS.items() if not isinstance(record, dict) or k not in record or not ok(record[k])]
    bad += [
        k
        for k in LISTS
        if isinstance(record, dict) and not (isinstance(record.get(k, []), list) and all(isinstance(t, str) for t in record.get(k, [])))
    ]
    if bad:
        raise MergeError(
            f"{adapter}/ftscale_adapter.json: corrupt 'quantization' entry ({', '.join(bad)}): save or export the adapter again"
        )
    return record


def replay_settings(edits: AdapterEdits, settings: dict | None, adapter: str) -> dict | None:
    """The quantisation to replay: the adapter's record, or the command line's settings for an adapter without one
    (given both, the command line is refused: it would silently replace what the run recorded)."""
    record = recorded_settings(edits, adapter)
    if record is not None and settings is not None:
        raise MergeError(
            f"{adapter} records its own quantisation: leave out --quant-type and its options (they are for adapters without one)"
        )
    return record or settings


def choose_base_weights(requested: str | None, edits: AdapterEdits, settings: dict | None, adapter: str) -> tuple[str, dict | None]:
    """(original | dequantized, the quantisation settings to replay or None). `settings`: what the command line
    gave (quant_type, double_quant, blocksize, compute_dtype, quant_storage) for an adapter without a record."""
    if requested is not None and requested not in BASE_WEIGHTS:
        raise MergeError(f"--base-weights {requested!r}: choose {' or '.join(BASE_WEIGHTS)}")
    mode = requested or "original"
    if mode == "original":
        return mode, None
    if edits.quantized_base is False:
        raise MergeError(
            f"{adapter} was trained on a base that was not quantised: --base-weights dequantized applies to QLoRA "
            "adapters only; leave it out to merge into the base as it is"
        )
    record = replay_settings(edits, settings, adapter)
    if record is None:
        raise MergeError(
            f"{adapter}: no quantisation settings (its ftscale_adapter.json has none: the adapter was saved by another "
            "tool or an older ftscale). Pass them: --quant-type nf4 (and --no-double-quant, --quant-blocksize, "
            "--quant-compute-dtype where training differed from the defaults), or --base-weights original"
        )
    return mode, record


def quantized_tensors(record: dict, shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The base tensors to replay the quantisation on: the record's list, or (without one) every 2-D weight that
    is not an embedding or the output head. Each must be in the base."""
    if "tensors" not in record:
        return {n for n, shape in shapes.items() if len(shape) == 2 and n.endswith(".weight") and not NOT_QUANTIZED.fullmatch(n)}
    missing = [n for n in record["tensors"] if n not in shapes]
    if missing:
        raise MergeError(f"the adapter's base quantised '{missing[0]}', which this base does not have: adapter and base do not match")
    return set(record["tensors"])


def trained_layout(edits: AdapterEdits) -> set[str]:
    """Base tensors the adapter was trained on transposed: a 4-bit model holds GPT-2's Conv1D weights as linear
    layers (transformers quantises the transpose), so peft learned their deltas in that layout."""
    record = edits.quantization
    names = record.get("transposed") if isinstance(record, dict) else None
    return set(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else set()


def as_trained(name: str, tensor: torch.Tensor, record: dict, replay: set[str]) -> torch.Tensor:
    """A base tensor as the trained model held it: quantised ones dequantised from their 4-bit form, other floating
    ones rounded through the compute dtype they were loaded in (then kept in fp32 by peft's k-bit preparation)."""
    if name in replay:
        return dequantized(tensor, record, transposed=name in set(record.get("transposed", ())))
    if tensor.is_floating_point():
        return tensor.to(DTYPES[record["compute_dtype"]])
    return tensor
