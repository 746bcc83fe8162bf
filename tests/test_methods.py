"""Every method through the one recipe: it learns, only adapter weights change, and the saved adapter reloads
to the same logits (through peft itself for peft methods)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from ftscale.config import load_config
from ftscale.data import collate
from ftscale.methods import load_adapter
from ftscale.model.loading import causal_lm, decoder_layers, load_base_model
from ftscale.recipes.sft import SFTRecipe
from ftscale.training.loss import ChunkedHeadLoss, loss_on_labelled_positions

from conftest import REPO, tiny_overrides
from helpers import METHOD_SETTINGS, train_losses


def run_recipe(model_dir, data, out, **extra) -> SFTRecipe:
    recipe = SFTRecipe(load_config(None, tiny_overrides(model_dir, data, out, **extra)))
    recipe.setup()
    return recipe


def logits(model, rows, packed: bool) -> torch.Tensor:
    batch = collate(rows, 0, packed)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_method_learns_keeps_base_frozen_and_reloads(method, tiny_model_dir, tiny_data, tmp_path):
    recipe = run_recipe(tiny_model_dir, tiny_data, tmp_path, **{"method.name": method, **METHOD_SETTINGS[method]})
    frozen = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    assert frozen and trainable

    recipe.train()
    adapter_dir = recipe.save_adapter()

    assert recipe.eval_loss_after < recipe.eval_loss_before, (recipe.eval_loss_before, recipe.eval_loss_after)
    for name, before in frozen.items():
        assert torch.equal(before, dict(recipe.model.named_parameters())[name]), f"frozen {name} changed"
    assert any(not torch.equal(v, dict(recipe.model.named_parameters())[n]) for n, v in trainable.items())

    # Only the adapter is on disk, never the base.
    files = {p.name for p in adapter_dir.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert json.loads((adapter_dir / "ftscale_adapter.json").read_text())["method"] == method

    rows = recipe.eval_rows[:2]
    expected = logits(recipe.model, rows, recipe.cfg.data.packing)
    base = load_base_model(recipe.cfg, torch.device("cpu"))
    if method == "bottleneck":
        reloaded = load_adapter(base, adapter_dir)
    else:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(base, str(adapter_dir))
    torch.testing.assert_close(logits(reloaded, rows, recipe.cfg.data.packing), expected, rtol=0, atol=1e-5)


def test_qlora_base_is_4bit_nf4(tiny_model_dir, tiny_data, tmp_path):
    import bitsandbytes as bnb

    recipe = run_recipe(tiny_model_dir, tiny_data, tmp_path, **{"method.name": "qlora"})
    layers = [m for m in recipe.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert all(m.weight.quant_state.nested for m in layers)  # double quantisation
    # Saving must not change the frozen 4-bit base (bitsandbytes' CPU repack round trip did: see bnb_cpu.py).
    before = logits(recipe.model, recipe.eval_rows[:1], packed=True)
    recipe.save_adapter()
    torch.testing.assert_close(logits(recipe.model, recipe.eval_rows[:1], packed=True), before, rtol=0, atol=0)


def test_gradient_accumulation_matches_a_bigger_batch(tiny_model_dir, tiny_data, tmp_path):
    """Loss is normalised by the tokens of the whole optimizer step, so 2 micro-batches of 1 row equal 1 of 2 rows."""
    curves = []
    for micro, accum in ((2, 1), (1, 2)):
        recipe = run_recipe(
            tiny_model_dir,
            tiny_data,
            tmp_path / f"{micro}x{accum}",
            **{"training.micro_batch_size": micro, "training.gradient_accumulation_steps": accum, "training.max_steps": 4},
        )
        recipe.train()
        curves.append(train_losses(recipe.history))
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-5)


def test_same_seed_same_run(tiny_model_dir, tiny_data, tmp_path):
    curves = []
    for i in range(2):
        recipe = run_recipe(tiny_model_dir, tiny_data, tmp_path / str(i), **{"training.max_steps": 3})
        recipe.train()
        curves.append(train_losses(recipe.history))
    assert curves[0] == curves[1]


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("gradient_checkpointing", True, True),
        ("compile", True, True),  # torch.compile of each decoder layer (inductor, on this CPU)
        ("loss_chunk_size", "null", None),  # the head in one piece; the default is chunks of 1024 positions
        ("loss_chunk_size", 5, 5),
    ],
    ids=["checkpointing", "compile", "loss-unchunked", "loss-chunks-of-5"],
)
def test_speed_settings_give_the_same_losses_and_adapter(key, value, expected, tiny_model_dir, tiny_data, tmp_path):
    curves, adapters = [], []
    for name, settings in (("reference", {"training.gradient_checkpointing": False}), ("setting", {f"training.{key}": value})):
        recipe = run_recipe(tiny_model_dir, tiny_data, tmp_path / name, **{"training.max_steps": 3, **settings})
        recipe.train()
        curves.append(train_losses(recipe.history))
        adapters.append({n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad})
    assert getattr(recipe.cfg.training, key) == expected
    model = causal_lm(recipe.model)  # and the setting took effect
    ran = {
        "gradient_checkpointing": lambda: model.is_gradient_checkpointing,
        "compile": lambda: all(layer._compiled_call_impl is not None for layer in decoder_layers(model)),
        "loss_chunk_size": lambda: (
            recipe.loss is loss_on_labelled_positions
            if expected is None
            else isinstance(recipe.loss, ChunkedHeadLoss) and recipe.loss.chunk == 5
        ),
    }
    assert ran[key]()
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-5)
    assert adapters[0].keys() == adapters[1].keys()  # compiling in place keeps the parameter names
    for n, p in adapters[0].items():  # Adam's first steps are about +-lr wherever a gradient is near 0: rounding shows
        torch.testing.assert_close(p, adapters[1][n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_bf16_autocast_trains(tiny_model_dir, tiny_data, tmp_path):
    recipe = run_recipe(tiny_model_dir, tiny_data, tmp_path, **{"training.precision": "bf16", "training.max_steps": 4})
    recipe.train()
    assert recipe.eval_loss_after < recipe.eval_loss_before
    assert all(p.dtype == torch.float32 for p in recipe.model.parameters() if p.requires_grad)  # fp32 master weights


def test_fp16_needs_cuda(tiny_model_dir, tiny_data, tmp_path):
    """Refused before loading where there is no CUDA device; accepted (and trains) where there is one."""
    from ftscale.config import ConfigError

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            run_recipe(tiny_model_dir, tiny_data, tmp_path, **{"training.precision": "fp16"})
        return
    recipe = run_recipe(tiny_model_dir, tiny_data, tmp_path, **{"training.precision": "fp16", "training.max_steps": 2})
    recipe.train()
    assert math.isfinite(recipe.history[-1]["train/loss"])


def test_too_little_data_for_one_step_is_a_clear_error(tiny_model_dir, tiny_data, tmp_path):
    from ftscale.config import ConfigError

    with pytest.raises(ConfigError, match="cannot fill one optimizer step"):
        run_recipe(tiny_model_dir, tiny_data, tmp_path, **{"training.micro_batch_size": 64})


def test_accelerate_launch_entry_point_with_wandb_offline(tiny_model_dir, tiny_data, tmp_path):
    """The user-facing command, end to end: `accelerate launch launch/sft.py --config ... overrides`."""
    overrides = tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "run", **{"logging.wandb.mode": "offline", "training.max_steps": 3})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "configs/accelerate/cpu.yaml"),
            str(REPO / "launch/sft.py"),
            "--config",
            str(REPO / "configs/smollm2-135m/lora.yaml"),
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    runs = list((tmp_path / "run/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert load_config(tmp_path / "run/config.yaml").training.max_steps == 3  # the resolved config is kept


def test_bad_data_fails_before_training_with_the_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [}\n')
    data = {"train": bad, "eval": bad}
    proc = subprocess.run(
        [sys.executable, "-m", "ftscale.cli", "train", *tiny_overrides(tiny_model_dir, data, tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and f"{bad}:2: not valid JSON" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]  # written first, for the post-mortem
    assert load_config(tmp_path / "run/config.yaml").data.train[0].path == str(bad)


def test_a_run_without_eval_data_completes_and_logs_no_eval(tiny_model_dir, tiny_data, tmp_path):
    """No held-out data (the default) means no eval metrics, not a crash at the last step."""
    out = tmp_path / "run"
    settings = {
        "data.eval": "[]",
        "training.max_steps": 2,
        "training.eval_every": 1,
        "logging.console": True,
        "logging.wandb.mode": "offline",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "ftscale.cli", "train", *tiny_overrides(tiny_model_dir, tiny_data, out, **settings)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_before"] is None and summary["eval_loss_after"] is None
    assert (out / "adapter/adapter_model.safetensors").is_file() and (out / "checkpoints/step-00000002/manifest.json").is_file()
    assert "eval/loss" not in proc.stderr and "step 2/2" in proc.stderr
    assert all("eval/loss" not in h for h in summary["history"])


def test_eval_fraction_holds_out_a_seeded_share_of_the_training_data(tiny_model_dir, tiny_data, tmp_path):
    def rows(seed):
        recipe = run_recipe(
            tiny_model_dir,
            tiny_data,
            tmp_path / str(seed),
            **{"data.eval": "[]", "data.eval_fraction": 0.25, "data.packing": False, "training.seed": seed},
        )
        train, held = [tuple(r.input_ids) for r in recipe.train_rows], [tuple(r.input_ids) for r in recipe.eval_rows]
        recipe.cleanup()
        return train, held

    train, held = rows(1)
    assert len(held) == 12 and len(train) == 36  # 48 examples, a quarter held out
    assert not set(held) & set(train)
    assert rows(1) == (train, held) and rows(2)[1] != held  # the seed decides which


def test_no_default_data(tmp_path):
    cfg = load_config(None)
    assert cfg.data.train == [] and cfg.data.eval == [] and cfg.data.eval_fraction == 0
