"""Streaming merge: agreement with peft's merge_and_unload, shard limits, atomic output, and clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from ftscale.merge import MergeError, parse_size, stream_merge, verify_merge
from ftscale.safetensors_stream import read_header, read_tensor

from conftest import REPO, build_tiny_model


def save_base(model, path: Path, shard: str | None = None) -> Path:
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return path


def randomise_adapter(peft_model, seed=0):
    """Give every adapter weight non-trivial values, as training would (fresh LoRA has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.data = (p.data + noise) if ("magnitude" in name or "ia3" in name) else noise * 4


def merged_state(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for fname in set(index["weight_map"].values()):
        infos, meta = read_header(out / fname)
        assert meta == {"format": "pt"}
        tensors.update({n: read_tensor(i) for n, i in infos.items()})
    assert set(tensors) == set(index["weight_map"])
    return tensors


def peft_reference(base_dir: Path, adapter_dir: Path, dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return {k: v for k, v in PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict().items()}


def assert_within_rounding(ours: torch.Tensor, theirs: torch.Tensor, name: str):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
    else:  # peft rounds twice (delta, then sum) in half precision, we round once: allow one unit in the last place
        ulp = torch.finfo(ours.dtype).eps * torch.maximum(ours.float().abs(), theirs.float().abs()).clamp_min(1e-3)
        assert ((ours.float() - theirs.float()).abs() <= ulp * 1.01).all(), name


METHODS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_rank_pattern": LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 3}
    ),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"], use_dora=True),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_peft_merge_and_unload(tmp_path, method, tied, sharded, dtype):
    base_dir = save_base(build_tiny_model(300, tie=tied).to(dtype), tmp_path / "base", "40KB" if sharded else None)
    assert (base_dir / "model.safetensors.index.json").is_file() == sharded
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), METHODS[method])
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")

    report = stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out", progress=False)
    ours, theirs = merged_state(tmp_path / "out"), peft_reference(base_dir, tmp_path / "adapter", dtype)
    assert set(theirs) - set(ours) <= {"lm_head.weight"}  # a tied head is not stored twice
    for name, tensor in ours.items():
        assert_within_rounding(tensor, theirs[name], name)
    assert report["merged_tensors"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.tie_word_embeddings == tied


def test_fan_in_fan_out_layout_gpt2(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=200, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    base_dir = save_base(base, tmp_path / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out", progress=False)
    ours, theirs = merged_state(tmp_path / "out"), peft_reference(base_dir, tmp_path / "adapter", torch.float32)
    for name, tensor in ours.items():
        assert_within_rounding(tensor, theirs[name], name)


def test_changed_tied_head_is_untied_and_matches_the_adapted_model(tmp_path):
    base_dir = save_base(build_tiny_model(300, tie=True), tmp_path / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert merged.config.tie_word_embeddings is False
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_on_the_embedding_and_a_trainable_head(tmp_path, tied):
    base_dir = save_base(build_tiny_model(300, tie=tied), tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=None if tied else ["lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out", progress=False)
    ours, theirs = merged_state(tmp_path / "out"), peft_reference(base_dir, tmp_path / "adapter", torch.float32)
    for name, tensor in ours.items():
        if name != "lm_head.weight" or not tied:  # with tied weights peft's merge also changes the head (see below)
            assert_within_rounding(tensor, theirs[name], name)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    # The adapted model used the adapted embedding for lookups only, so the merged model must be untied to match it.
    assert merged.config.tie_word_embeddings is False
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_trainable_token_rows(tmp_path):
    base_dir = save_base(build_tiny_model(300, tie=False), tmp_path / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 7]}),
    )
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out", progress=False)
    ours, theirs = merged_state(tmp_path / "out"), peft_reference(base_dir, tmp_path / "adapter", torch.float32)
    torch.testing.assert_close(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])


@pytest.fixture
def lora_pair(tmp_path):
    base_dir = save_base(build_tiny_model(300, tie=False, layers=3), tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    return base_dir, tmp_path / "adapter"


def test_every_shard_within_the_limit_and_oversized_tensors_alone(lora_pair, tmp_path):
    base_dir, adapter = lora_pair
    limit = parse_size("50KB")
    report = stream_merge(base_dir, adapter, tmp_path / "out", max_shard_size="50KB", progress=False)
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert report["shards"] == len(shards) > 5
    total = 0
    for fname in shards:
        infos, _ = read_header(tmp_path / "out" / fname)
        size = sum(i.nbytes for i in infos.values())
        total += size
        assert size <= limit or len(infos) == 1, f"{fname}: {size} bytes in {len(infos)} tensors"
    assert total == index["metadata"]["total_size"]
    oversized = [
        f
        for f in shards
        if len(read_header(tmp_path / "out" / f)[0]) == 1 and sum(i.nbytes for i in read_header(tmp_path / "out" / f)[0].values()) > limit
    ]
    assert oversized  # the 300 x 64 fp32 embedding (76.8 kB) is larger than the limit and has a shard of its own
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.config.vocab_size == 300


def test_output_dtype_and_model_files(lora_pair, tmp_path):
    base_dir, adapter = lora_pair
    (base_dir / "tokenizer_config.json").write_text("{}")
    stream_merge(base_dir, adapter, tmp_path / "out", dtype="bf16", progress=False)
    assert {t.dtype for t in merged_state(tmp_path / "out").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out/config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "out/generation_config.json").is_file() and (tmp_path / "out/tokenizer_config.json").is_file()


def test_verify_reports_a_tiny_logit_difference(tiny_tokenizer, tmp_path):
    base_dir = save_base(build_tiny_model(len(tiny_tokenizer)), tmp_path / "base")
    tiny_tokenizer.save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert verify_merge(base_dir, tmp_path / "adapter", tmp_path / "out")["max_abs_logit_diff"] < 1e-4
    # A wrong merge is caught: merge a different adapter and verify against the first.
    randomise_adapter(model, seed=1)
    model.save_pretrained(tmp_path / "other")
    assert verify_merge(base_dir, tmp_path / "other", tmp_path / "out")["max_abs_logit_diff"] > 1e-2


def test_existing_output_is_refused_unless_overwrite(lora_pair, tmp_path):
    base_dir, adapter = lora_pair
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("user data")
    with pytest.raises(MergeError, match="exists: choose another --out or pass --overwrite"):
        stream_merge(base_dir, adapter, tmp_path / "out", progress=False)
    assert (tmp_path / "out/keep.txt").read_text() == "user data"
    stream_merge(base_dir, adapter, tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out/keep.txt").exists()


def test_a_crash_mid_merge_leaves_no_output(lora_pair, tmp_path, monkeypatch):
    from ftscale import safetensors_stream

    base_dir, adapter = lora_pair
    calls = {"n": 0}
    original = safetensors_stream.StreamingSafetensorsWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError(28, "No space left on device")
        return original(self, name, tensor)

    monkeypatch.setattr(safetensors_stream.StreamingSafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        stream_merge(base_dir, adapter, tmp_path / "out", max_shard_size="50KB", progress=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out*")) == []


def test_prompt_methods_and_bottleneck_are_refused_with_advice(tmp_path):
    base_dir = save_base(build_tiny_model(300), tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "prompt")
    with pytest.raises(MergeError, match="prompt tuning adapter: .*nothing to merge.*PeftModel.from_pretrained"):
        stream_merge(base_dir, tmp_path / "prompt", tmp_path / "out", progress=False)
    (tmp_path / "bottleneck").mkdir()
    (tmp_path / "bottleneck/bottleneck_config.json").write_text("{}")
    with pytest.raises(MergeError, match="bottleneck adapters.*cannot be merged.*load_adapter"):
        stream_merge(base_dir, tmp_path / "bottleneck", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_names_the_first_mismatch(lora_pair, tmp_path):
    _, adapter = lora_pair
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
        )
    )
    save_base(wider, tmp_path / "wider")
    with pytest.raises(
        MergeError, match=r"adapter's 'model.layers.0.mlp.down_proj.weight' has shape \(64, 128\), the base's is \(96, 128\)"
    ):
        stream_merge(tmp_path / "wider", adapter, tmp_path / "out", progress=False)
    shallow = save_base(build_tiny_model(300, tie=False, layers=1), tmp_path / "shallow")
    with pytest.raises(MergeError, match="changes tensor 'model.layers.1.*which this base does not have"):
        stream_merge(shallow, adapter, tmp_path / "out", progress=False)


def test_cli_merge_reports_qlora_note_and_errors(lora_pair, tmp_path):
    base_dir, adapter = lora_pair
    (adapter / "ftscale_adapter.json").write_text(json.dumps({"method": "qlora", "quantized_base": True}))

    def run(*a):
        return subprocess.run([sys.executable, "-m", "ftscale.cli", "merge", *a], capture_output=True, text=True, cwd=REPO)

    ok = run("--base", str(base_dir), "--adapter", str(adapter), "--out", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert "merged into the original (non-quantised) base weights" in json.loads(ok.stdout.splitlines()[0])["note"]
    again = run("--base", str(base_dir), "--adapter", str(adapter), "--out", str(tmp_path / "out"))
    assert again.returncode != 0 and "ftscale merge: error: output folder" in again.stderr and "Traceback" not in again.stderr


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("500mb") == 5 * 10**8 and parse_size(123) == 123
    with pytest.raises(MergeError, match="cannot read size"):
        parse_size("two gigs")
