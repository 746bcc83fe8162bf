"""`ftscale export-adapter CKPT OUT`: a consolidated adapter in peft's format (or ftscale's bottleneck format) from
any complete checkpoint, however many ranks wrote it, without the training job and without the base weights."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ftscale.atomic_files import partial_folder, replace_folder
from ftscale.checkpoint.layout import ADAPTER, ADAPTER_CONFIG, BASE_CONFIG, CONFIG, CheckpointError, verify
from ftscale.checkpoint.state import trainable_parameters
from ftscale.config import load_config
from ftscale.methods import attach_adapter, save_adapter


def export_adapter(ckpt_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    ckpt = verify(Path(ckpt_dir), checksums=True)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {out} exists: choose another or pass --overwrite")
    if BASE_CONFIG not in ckpt.manifest["files"]:
        raise CheckpointError(
            f"{ckpt.path}: no {BASE_CONFIG} (the base model folder had no config.json when this checkpoint was "
            "written), so the adapter's model cannot be rebuilt from the checkpoint alone"
        )
    cfg = load_config(ckpt.path / CONFIG)
    cfg.method.prompt.init_text = None  # the weights come from the checkpoint; no tokenizer needed to initialise
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(ckpt.path / BASE_CONFIG, Path(tmp) / "config.json")
        base_config = AutoConfig.from_pretrained(tmp)
    # The base is only a skeleton on the meta device: no memory, no weights; only the adapter becomes real.
    # (The adapter is attached outside the meta context: peft keeps plain tensors such as prompt token ids.)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(base_config)
    model = attach_adapter(base, cfg)
    tensors = ckpt.read_tensors(ADAPTER)
    expected = {n: tuple(p.shape) for n, p in trainable_parameters(model).items()}
    wrong = sorted(set(expected) ^ set(tensors)) or sorted(n for n in expected if tuple(tensors[n].shape) != expected[n])
    if wrong:
        raise CheckpointError(
            f"{ckpt.path}: adapter tensors do not fit the {cfg.method.name} model described by its config (first: {wrong[0]})"
        )
    model.load_state_dict(tensors, strict=False, assign=True)
    tmp_out = partial_folder(out)
    try:
        save_adapter(model, tmp_out, cfg)
        # The config the training run saved (true base path, target modules as trained) replaces the rebuilt one.
        for f in ckpt.listed(ADAPTER_CONFIG):
            shutil.copy2(f, tmp_out / f.name)
        replace_folder(tmp_out, out)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    return {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "method": cfg.method.name,
        "out": str(out),
        "tensors": len(tensors),
        "written_by_ranks": ckpt.manifest["world_size"],
    }
