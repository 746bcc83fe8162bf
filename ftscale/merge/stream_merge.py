"""`ftscale merge`: merge an adapter into its base tensor by tensor and stream the result into size-limited shards.

Peak memory is a few copies of the largest single tensor (the tensor read, its fp32 working copy and the delta),
whatever the model's size. Output goes to a temporary folder beside the target and is renamed into place only when
every shard and the index are complete."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ftscale.atomic_files import partial_folder, replace_folder
from ftscale.json_files import read_json
from ftscale.merge.adapter_edits import AdapterEdits, MergeError, read_adapter_edits
from ftscale.merge.quantized_base import as_trained, choose_base_weights, quantized_tensors, trained_layout
from ftscale.safetensors_stream import (
    StreamingSafetensorsWriter,
    TensorInfo,
    read_header,
    read_tensor,
    tensor_bytes,
)

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|msgpack|h5)$|.*\.safetensors\.index\.json$|.*\.bin\.index\.json$")
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: str | int) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, as transformers' max_shard_size); '1GiB', '500MB', 12345 also work."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper()) if isinstance(size, str) else None
    if not m:
        raise MergeError(f"cannot read size {size!r}: use a number of bytes or a value like 2GB, 500MB, 1GiB")
    value = int(float(m.group(1)) * SIZE_UNITS[m.group(2) or "B"])
    if value <= 0:
        raise MergeError(f"shard size {size!r} is not positive: use a value like 2GB or 500MB")
    return value


def base_tensors(base_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a single-file or sharded safetensors checkpoint, in checkpoint order."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _weight_map(index)
        files = sorted(set(weight_map.values()))
    elif (base_dir / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise MergeError(f"{base_dir}: no model.safetensors or model.safetensors.index.json (the merge reads safetensors bases)")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        if not (base_dir / name).is_file():
            raise MergeError(f"{index}: lists shard {name}, which is not in {base_dir}: the base is incomplete")
        tensors.update(read_header(base_dir / name)[0])
    for name, file in (weight_map or {}).items():
        if name not in tensors or tensors[name].file.name != file:
            raise MergeError(f"{index}: says tensor '{name}' is in {file}, which does not hold it: the base is inconsistent")
    return tensors


def _weight_map(index: Path) -> dict[str, str]:
    index_doc = read_json(index, MergeError)
    weight_map = index_doc.get("weight_map") if isinstance(index_doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and v != ".." for v in weight_map.values()):
        raise MergeError(f"{index}: corrupt index: it needs a 'weight_map' of tensor name -> shard file in this folder")
    return weight_map


def _tied_embedding(tensors: dict[str, TensorInfo]) -> str | None:
    return next((n for n in tensors if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))), None)


def _resolve_targets(edits: AdapterEdits, tensors: dict[str, TensorInfo], config: dict, transposed: set[str]) -> dict[str, str]:
    """Map each edited tensor to the base tensor it starts from. A tied output head that the adapter changes
    starts from the input embedding and becomes a tensor of its own (the output config is then untied)."""
    sources = {}
    for name in [n for n in edits.edits if n in edits.optional and n not in tensors]:
        del edits.edits[name]
    position = {n: i for i, n in enumerate(tensors)}
    for name in sorted(edits.edits, key=lambda n: position.get(n, len(position))):  # report mismatches in model order
        if name in tensors:
            sources[name] = name
        elif config.get("tie_word_embeddings") and name.endswith("lm_head.weight") and _tied_embedding(tensors):
            sources[name] = _tied_embedding(tensors)
        else:
            raise MergeError(
                f"adapter changes tensor '{name}', which this base does not have: the adapter was trained on another "
                f"model (first base tensors: {', '.join(list(tensors)[:3])})"
            )
        want, have = edits.expected_shapes.get(name), tuple(tensors[sources[name]].shape)
        if sources[name] in transposed:  # the adapter was trained on the transposed layout (see trained_layout)
            have = have[::-1]
        if want is not None and (len(want) != len(have) or any(w is not None and w != h for w, h in zip(want, have, strict=True))):
            shown = "(" + ", ".join("any" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
            raise MergeError(f"adapter's '{name}' has shape {shown}, the base's is {have}: adapter and base do not match")
        if edits.min_rows.get(name, 0) > have[0]:
            raise MergeError(
                f"adapter changes row {edits.min_rows[name] - 1} of '{name}', which has {have[0]} rows: adapter and base do not match"
            )
    embedding = _tied_embedding(tensors)
    if config.get("tie_word_embeddings") and embedding in edits.edits and "lm_head.weight" not in sources:
        # The adapted model changed only the input lookup; its tied head still used the original weights. Merging
        # into a tied model would change the head too (as peft's merge_and_unload does), so the head is untied.
        sources["lm_head.weight"] = embedding
    return sources


def _plan_shards(items: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list]:
    """Greedy: start a new shard when the next tensor would pass the limit. A tensor larger than the limit gets
    a shard of its own (a tensor is never split)."""
    shards: list[list] = [[]]
    size = 0
    for item in items:
        nbytes = tensor_bytes(item[2], item[1])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def stream_merge(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    max_shard_size: str | int = "2GB",
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    base_weights: str | None = None,
    quantization: dict | None = None,
) -> dict:
    """base_weights: original (default) | dequantized (QLoRA: the base as training computed with it; see
    ftscale.merge.quantized_base); quantization: the settings to replay for an adapter that recorded none."""
    base, adapter, out = Path(base), Path(adapter), Path(out)
    if out.exists() and not overwrite:
        raise MergeError(f"output folder {out} exists: choose another --out or pass --overwrite")
    max_bytes = parse_size(max_shard_size)
    edits = read_adapter_edits(adapter)
    mode, record = choose_base_weights(base_weights, edits, quantization, str(adapter))
    config = _base_config(base)
    tensors = base_tensors(base)
    transposed = trained_layout(edits)
    sources = _resolve_targets(edits, tensors, config, transposed)
    replay = quantized_tensors(record, {n: t.shape for n, t in tensors.items()}) if record else set()
    out_dtype = OUT_DTYPES[dtype] if dtype else None

    def target_dtype(info: TensorInfo) -> torch.dtype:
        return out_dtype if out_dtype is not None and info.dtype.is_floating_point else info.dtype

    names = list(tensors) + [n for n in sources if n not in tensors]  # untied heads come last
    items = [(n, target_dtype(tensors[sources.get(n, n)]), tensors[sources.get(n, n)].shape) for n in names]
    shards = _plan_shards(items, max_bytes)
    total = sum(tensor_bytes(s, d) for _, d, s in items)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if free < total:
        raise MergeError(f"merging needs {total / 1e9:.2f} GB in {out.parent}, only {free / 1e9:.2f} GB is free")

    tmp = partial_folder(out)
    start = time.monotonic()
    weight_map = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress, file=sys.stderr)
    try:
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            writer = StreamingSafetensorsWriter(tmp / fname, shard, {"format": "pt"})
            for name, dt, _shape in shard:
                tensor = read_tensor(tensors[sources.get(name, name)])
                if record is not None:  # the base as training computed with it
                    tensor = as_trained(sources.get(name, name), tensor, record, replay)
                if name in edits.edits:
                    work = tensor.float()  # every delta in fp32, rounded once to the output dtype
                    flip = sources.get(name, name) in transposed
                    work = work.T if flip else work
                    for edit in edits.edits[name]:
                        work = edit(work)
                    tensor = work.T.contiguous() if flip else work
                tensor = tensor.to(dt)
                writer.write(name, tensor)
                weight_map[name] = fname
                bar.update(tensor.nbytes)
                del tensor
            writer.close()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _copy_model_files(base, tmp, config, untied=any(n not in tensors for n in sources), out_dtype=dtype)
        replace_folder(tmp, out)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - start
    report = {
        "out": str(out),
        "shards": len(shards),
        "tensors": len(items),
        "merged_tensors": len(edits.edits),
        "base_weights": mode,
        "dequantized_tensors": len(replay),
        "bytes": total,
        "seconds": round(seconds, 3),
        "bytes_per_s": round(total / max(seconds, 1e-9)),
    }
    if edits.quantized_base and mode == "original":
        report["note"] = (
            "QLoRA adapter: merged into the original (non-quantised) base weights, not the dequantised 4-bit ones it was "
            "trained against; the merged model differs from the trained one by the quantisation error (--verify measures "
            "it; --base-weights dequantized gives the trained model)"
        )
    return report


def _base_config(base: Path) -> dict:
    """The base's config.json: without it the merged folder would not load, so the merge refuses to start."""
    path = base / "config.json"
    if not base.is_dir():
        raise MergeError(f"--base {base}: no such model folder")
    if not path.is_file():
        raise MergeError(
            f"{base}: no config.json, so a merged model written from it would not load with from_pretrained: "
            "copy the base model's config.json into that folder"
        )
    config = read_json(path, MergeError)
    if not isinstance(config, dict):
        raise MergeError(f"{path}: must hold a JSON object")
    return config


def _copy_model_files(base: Path, out: Path, config: dict, untied: bool, out_dtype: str | None) -> None:
    """Config, generation config, tokenizer and every other non-weight file of the base."""
    for f in base.iterdir():
        if f.is_file() and not WEIGHT_FILES.fullmatch(f.name) and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    if untied:
        config["tie_word_embeddings"] = False
    if out_dtype:
        config["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[out_dtype]
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
