"""QLoRA merge: into the base as training computed with it (each quantised tensor quantised and dequantised with the
run's settings) or into the original weights; measured against the trained model itself."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from ftscale.cli import main
from ftscale.config import load_config
from ftscale.data import build_datasets, collate
from ftscale.merge import MergeError, stream_merge, verify_merge
from ftscale.methods import load_adapter
from ftscale.model.loading import load_base_model, load_tokenizer
from ftscale.recipes.sft import recipe_main

from conftest import build_tiny_model, tiny_overrides, write_jsonl
from helpers import run

# The settings an adapter without a record of its own would be merged with (`--quant-type nf4`): the recipe's defaults.
NF4 = {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32", "quant_storage": "uint8"}


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir, tiny_data):
    """A real QLoRA run of the tiny model: its output folder."""
    out = tmp_path_factory.mktemp("qlora-run")
    settings = {"method.name": "qlora", "training.max_steps": 8, "training.learning_rate": 1e-2}
    recipe_main(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, out, **settings)))
    return out


def merge_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`ftscale merge ARGS` in this process: the command line's own code, without an interpreter start-up each."""
    try:
        code = main(["merge", *args])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@torch.no_grad()
def logits(model, rows) -> torch.Tensor:
    return model(**collate(rows, 0, packed=False), use_cache=False).logits


def test_the_run_records_how_its_base_was_quantised(qlora_run):
    meta = json.loads((qlora_run / "adapter/ftscale_adapter.json").read_text())
    record = meta["quantization"]
    assert {k: record[k] for k in NF4} == NF4
    # every linear layer of the 2-layer Llama, named as in the base checkpoint; embeddings and head stay unquantised
    assert len(record["tensors"]) == 14 and "model.layers.1.mlp.down_proj.weight" in record["tensors"]
    assert not any("embed" in t or "lm_head" in t for t in record["tensors"])
    exported = json.loads(next((qlora_run / "checkpoints").glob("step-*/adapter_config/ftscale_adapter.json")).read_text())
    assert exported["quantization"] == record  # checkpoints carry it too, so export-adapter keeps it


def test_dequantized_merge_is_the_trained_model_and_the_original_merge_is_not(qlora_run, tiny_model_dir, tmp_path):
    cfg = load_config(qlora_run / "config.yaml")
    trained = load_adapter(load_base_model(cfg, torch.device("cpu")), qlora_run / "adapter").eval()  # the recipe's own path
    tokenizer, _ = load_tokenizer(cfg.model)
    rows = build_datasets(cfg.data, tokenizer, cfg.training.seed).eval
    reference = logits(trained, rows[:4])
    diffs = {}
    for mode in ("dequantized", "original"):
        report = stream_merge(tiny_model_dir, qlora_run / "adapter", tmp_path / mode, dtype="fp32", base_weights=mode, progress=False)
        assert report["base_weights"] == mode and report["dequantized_tensors"] == (14 if mode == "dequantized" else 0)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / mode, dtype=torch.float32).eval()
        diffs[mode] = (logits(merged, rows[:4]) - reference).abs().max().item()
    print(f"\nmax |logit difference| to the trained QLoRA model: {diffs}")
    assert diffs["dequantized"] < 1e-4  # fp32 rounding: the same products, summed in another order
    assert diffs["original"] > 1e-2 and diffs["original"] > 100 * diffs["dequantized"]  # the quantisation error
    # --verify measures the same thing from the command line's side
    checked = verify_merge(tiny_model_dir, qlora_run / "adapter", tmp_path / "dequantized", base_weights="dequantized")
    assert checked["max_abs_logit_diff"] < 1e-4
    to_trained = checked["trained_model"]["max_abs_logit_diff"]
    assert to_trained["merge_into_dequantized"] < 1e-4 < 1e-2 < to_trained["merge_into_original"]


def test_default_is_the_original_weights_and_verify_reports_held_out_loss(qlora_run, tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "merged"
    cmd = ["--base", str(tiny_model_dir), "--adapter", str(qlora_run / "adapter"), "--out", str(out), "--dtype", "fp32"]
    code, stdout, stderr = merge_cli(capsys, *cmd, "--verify", "--verify-data", str(tiny_data["eval"]))
    assert code == 0, stderr[-2000:]
    report, checked = (json.loads(line) for line in stdout.splitlines()[-2:])
    assert report["base_weights"] == "original" and "--base-weights dequantized gives the trained model" in report["note"]
    losses = checked["trained_model"]["heldout_loss"]
    assert set(losses) == {"trained", "merge_into_dequantized", "merge_into_original"}
    assert losses["merge_into_dequantized"] == pytest.approx(losses["trained"], rel=1e-6)
    assert losses["merge_into_original"] != pytest.approx(losses["trained"], rel=1e-6)
    summary = json.loads((qlora_run / "summary.json").read_text())
    assert losses["trained"] == pytest.approx(summary["eval_loss_after"], rel=1e-5)  # the loss training reported


def test_an_adapter_without_a_record_merges_with_the_settings_given(qlora_run, tiny_model_dir, tmp_path, capsys):
    """Another tool's QLoRA adapter: refused without settings, naming the option; with --quant-type it merges into
    the same weights as the recorded settings give (the quantised tensors found by rule: every 2-D weight but
    embeddings and head)."""
    foreign = tmp_path / "foreign"
    shutil.copytree(qlora_run / "adapter", foreign)
    meta = json.loads((foreign / "ftscale_adapter.json").read_text())
    del meta["quantization"]
    (foreign / "ftscale_adapter.json").write_text(json.dumps(meta))
    cmd = ["--base", str(tiny_model_dir), "--adapter", str(foreign)]
    code, _, stderr = merge_cli(capsys, *cmd, "--out", str(tmp_path / "refused"), "--base-weights", "dequantized")
    assert code == 2 and "no quantisation settings" in stderr and "--quant-type nf4" in stderr
    assert not (tmp_path / "refused").exists()
    code, stdout, stderr = merge_cli(capsys, *cmd, "--out", str(tmp_path / "given"), "--base-weights", "dequantized", "--quant-type", "nf4")
    assert code == 0, stderr[-2000:]
    assert json.loads(stdout.splitlines()[0])["dequantized_tensors"] == 14
    stream_merge(tiny_model_dir, qlora_run / "adapter", tmp_path / "recorded", base_weights="dequantized", progress=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "given").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "recorded").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --verify compares with the trained model with the settings given; without them it says why it cannot.
    code, stdout, stderr = merge_cli(capsys, *cmd, "--out", str(tmp_path / "v"), "--quant-type", "nf4", "--verify")
    assert code == 0, stderr[-2000:]
    assert json.loads(stdout.splitlines()[-1])["trained_model"]["max_abs_logit_diff"]["merge_into_dequantized"] < 1e-4
    code, stdout, _ = merge_cli(capsys, *cmd, "--out", str(tmp_path / "u"), "--verify")
    assert code == 0 and "pass --quant-type" in json.loads(stdout.splitlines()[-1])["note"]


def test_quantisation_options_that_would_be_ignored_or_override_a_record_are_refused(qlora_run, tiny_model_dir, tmp_path, capsys):
    cmd = ["--base", str(tiny_model_dir), "--adapter", str(qlora_run / "adapter")]
    cases = {
        "records its own quantisation": ["--base-weights", "dequantized", "--quant-type", "fp4"],
        "--quant-type is used by --base-weights dequantized and by --verify": ["--quant-type", "nf4"],
        "go with --quant-type": ["--quant-blocksize", "128"],
        "invalid choice: 100": ["--base-weights", "dequantized", "--quant-type", "nf4", "--quant-blocksize", "100"],
        "no conversation to compare on": ["--verify", "--verify-data", str(write_jsonl(tmp_path / "empty.jsonl", []))],
    }
    for message, options in cases.items():
        code, _, stderr = merge_cli(capsys, *cmd, "--out", str(tmp_path / "out"), *options)
        assert code == 2 and message in stderr, (options, stderr[-2000:])
        assert not (tmp_path / "out").exists(), options


def test_dequantized_is_refused_for_an_adapter_trained_without_quantisation(tiny_model_dir, tiny_data, tmp_path, capsys):
    recipe_main(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "lora", **{"training.max_steps": 1})))
    cmd = ["--base", str(tiny_model_dir), "--adapter", str(tmp_path / "lora/adapter"), "--out", str(tmp_path / "m")]
    code, _, stderr = merge_cli(capsys, *cmd, "--base-weights", "dequantized")
    assert code == 2 and "was trained on a base that was not quantised" in stderr, stderr[-2000:]
    plain = stream_merge(tiny_model_dir, tmp_path / "lora/adapter", tmp_path / "m", progress=False)  # the default: as it is
    assert plain["base_weights"] == "original" and plain["dequantized_tensors"] == 0


@pytest.mark.parametrize(
    "record, message",
    [
        ({**NF4, "tensors": [], "blocksize": "64"}, "blocksize"),
        ({**NF4, "tensors": [], "blocksize": 100}, "blocksize"),
        ({**NF4, "tensors": [], "quant_storage": ["uint8"]}, "quant_storage"),
        ({**NF4, "tensors": "all"}, "tensors"),
        ([1, 2], "quant_type, double_quant"),
        ({**NF4, "tensors": ["model.nope.weight"]}, "quantised 'model.nope.weight'"),
    ],
)
def test_a_damaged_record_is_refused_naming_it(qlora_run, tiny_model_dir, tmp_path, record, message):
    adapter = tmp_path / "adapter"
    shutil.copytree(qlora_run / "adapter", adapter)
    meta = json.loads((adapter / "ftscale_adapter.json").read_text())
    (adapter / "ftscale_adapter.json").write_text(json.dumps({**meta, "quantization": record}))
    with pytest.raises(MergeError, match=message):
        stream_merge(tiny_model_dir, adapter, tmp_path / "out", base_weights="dequantized", progress=False)
    assert not (tmp_path / "out").exists()
    # The merge into the original weights does not use the record: it is not refused for it.
    assert stream_merge(tiny_model_dir, adapter, tmp_path / "out", progress=False)["base_weights"] == "original"


def test_the_dequantized_merge_streams_one_tensor_at_a_time(tmp_path):
    """A 190 MB base (largest tensor 2 MB) merged into 20 MB shards with the quantisation replayed: the merge's own
    memory (measured after a warm-up merge, so the libraries' one-time allocations do not count; 12-20 MB here)
    stays within 15 of its largest tensors, far from the model; every shard keeps the limit."""
    models = {}
    for layers in (2, 20):
        base, adapter = tmp_path / f"base-{layers}", tmp_path / f"adapter-{layers}"
        build_tiny_model(400, layers=layers, hidden=512, intermediate=1024).save_pretrained(base)
        get_peft_model(
            build_tiny_model(400, layers=layers, hidden=512, intermediate=1024), LoraConfig(r=4, target_modules="all-linear")
        ).save_pretrained(adapter)
        models[layers] = (str(base), str(adapter), str(tmp_path / f"out-{layers}"))
    script = textwrap.dedent(f"""
        import json, re
        from ftscale.merge import stream_merge
        def status(key):
            return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        def merge(base, adapter, out):
            return stream_merge(base, adapter, out, max_shard_size="20MB", base_weights="dequantized", quantization={NF4!r}, progress=False)
        merge(*{models[2]!r})  # warm-up: the libraries' one-time allocations
        open("/proc/self/clear_refs", "w").write("5")  # Linux resets the high-water mark
        before = status("VmRSS")
        report = merge(*{models[20]!r})
        print(json.dumps({{"grew": status("VmHWM") - before, **report}}))
    """)
    proc = run([sys.executable, "-c", script])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    model_bytes = sum(f.stat().st_size for f in Path(models[20][0]).glob("*.safetensors"))
    largest = 512 * 1024 * 4  # an MLP projection in fp32
    print(f"\ndequantized merge of a {model_bytes / 1e6:.0f} MB base: peak RSS grew {report['grew'] / 1e6:.1f} MB")
    assert report["dequantized_tensors"] == 140 and model_bytes > 180e6
    assert report["grew"] < 15 * largest < model_bytes / 5  # tensors' worth, not the model's
    for shard in Path(models[20][2]).glob("model-*.safetensors"):
        assert shard.stat().st_size <= 20e6 + 64 * 1024, shard  # the limit plus the shard's header


def test_a_gpt2_style_base_with_transposed_weights_is_replayed_as_transformers_quantised_it(tiny_tokenizer, tiny_data, tmp_path):
    """GPT-2's Conv1D layers store their weight transposed; a 4-bit model holds them as linear layers (transformers
    quantises the transpose), so peft learns the deltas transposed. The run records those tensors; the dequantized
    merge still reproduces the trained model, and both merges apply the deltas in the layout they were learned in."""
    base = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    out = tmp_path / "run"
    recipe_main(
        load_config(
            None, tiny_overrides(base, tiny_data, out, **{"method.name": "qlora", "training.max_steps": 4, "training.learning_rate": 1e-2})
        )
    )
    record = json.loads((out / "adapter/ftscale_adapter.json").read_text())["quantization"]
    assert record["transposed"] and set(record["transposed"]) <= set(record["tensors"])
    stream_merge(base, out / "adapter", tmp_path / "merged", dtype="fp32", base_weights="dequantized", progress=False)
    checked = verify_merge(base, out / "adapter", tmp_path / "merged", base_weights="dequantized")
    to_trained = checked["trained_model"]["max_abs_logit_diff"]
    print(f"\nGPT-2 style base, max |logit difference| to the trained model: {to_trained}")
    assert checked["max_abs_logit_diff"] < 1e-4 and to_trained["merge_into_dequantized"] < 1e-4 < to_trained["merge_into_original"]
    # The merge into the original weights applies the deltas in the layout they were learned in, too.
    stream_merge(base, out / "adapter", tmp_path / "original", dtype="fp32", progress=False)
    assert verify_merge(base, out / "adapter", tmp_path / "original")["max_abs_logit_diff"] < 1e-4
