"""Which base weights a QLoRA adapter is merged into: the original ones, or the ones training computed with (each
quantised tensor quantised and dequantised again with the run's own settings, one tensor at a time).

`dequantized` gives back the model training evaluated (logits within fp32 rounding of the 4-bit model + adapter).
The default stays `original`, because it measured better: on the SmolLM2-135M QLoRA demo the merge into the
original weights matched more held-out answers in every run (exact match 0.83 vs 0.67, 0.88 vs 0.58, 0.58 vs 0.25)
and had the lower held-out loss in three of four, although its logits differ from the trained model's by up to
~9.5. Figures and the command in bench/RESULTS.md (`python bench/qlora_merge.py`)."""

from __future__ import annotations

import re

from ftscale.merge.adapter_edits import AdapterEdits, MergeError

BASE_WEIGHTS = ("original", "dequantized")
# Tensors transformers keeps unquantised in a 4-bit model (embeddings and the output head): for adapters without a
# record of the quantised tensors, every other 2-D weight is taken to have been quantised.
NOT_QUANTIZED = re.compile(r".*(embed|wte|wpe|lm_head|word_embeddings|position_embeddings).*")


def choose_base_weights(requested: str | None, edits: AdapterEdits, settings: dict | None, adapter: str) -> tuple[str, dict | None]:
    """(original | dequantized, the quantisation settings to replay or None). `settings`: what the command line
    gave (quant_type, double_quant, blocksize, compute_dtype, quant_storage), overriding the adapter's record."""
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
    if edits.quantization is None and settings is None:
        raise MergeError(
            f"{adapter}: no quantisation settings (its ftscale_adapter.json has none: the adapter was saved by another "
            "tool or an older ftscale). Pass them: --quant-type nf4 (and --no-double-quant, --quant-blocksize, "
            "--quant-compute-dtype where training differed from the defaults), or --base-weights original"
        )
    return mode, {**(edits.quantization or {}), **(settings or {})}


def quantized_tensors(record: dict, shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The base tensors to replay the quantisation on: the record's list, or (without one) every 2-D weight that
    is not an embedding or the output head. Each must be in the base."""
    if "tensors" not in record:
        return {n for n, shape in shapes.items() if len(shape) == 2 and n.endswith(".weight") and not NOT_QUANTIZED.fullmatch(n)}
    missing = [n for n in record["tensors"] if n not in shapes]
    if missing:
        raise MergeError(f"the adapter's base quantised '{missing[0]}', which this base does not have: adapter and base do not match")
    return set(record["tensors"])
