"""Performance settings that must not change what is learnt: the output head only at labelled positions, and
`auto` dtypes, precision and attention kernel chosen from the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftscale.config import ConfigError, load_config
from ftscale.data.packing import collate, packed_row
from ftscale.methods import attach_adapter
from ftscale.model.auto_settings import DeviceCapabilities, resolve_auto
from ftscale.model.loading import causal_lm
from ftscale.recipes.sft import SFTRecipe
from ftscale.training.loss import loss_on_labelled_positions, supports_labelled_head

from conftest import build_tiny_model, tiny_overrides


def rows(tokenizer_size: int) -> list:
    """Examples of different lengths with a prompt (no loss) and an answer (loss)."""
    rng = np.random.default_rng(0)
    out = []
    for n, prompt in ((9, 4), (14, 6), (6, 2)):
        ids = rng.integers(3, tokenizer_size, n)
        out.append((ids, np.arange(n) >= prompt))
    return out


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bottleneck"])
@pytest.mark.parametrize("layout", ["padded", "packed", "padding_free"])
def test_the_head_on_labelled_positions_gives_the_same_loss_and_gradients(layout, method, tiny_tokenizer):
    settings = [f"method.name={method}"]  # dropout is 0 by default: the two passes see the same network
    model = attach_adapter(build_tiny_model(len(tiny_tokenizer)), load_config(None, settings))
    assert supports_labelled_head(model)
    examples = rows(len(tiny_tokenizer))
    if layout == "packed":
        batch_rows = [packed_row(examples[:2], packed=True), packed_row(examples[2:], packed=True)]
    else:
        batch_rows = [packed_row([e], packed=False) for e in examples]
    batch = collate(batch_rows, 0, packed=layout != "padded", padding_free=layout == "padding_free")
    count = sum(r.loss_tokens for r in batch_rows)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    projected = []
    hook = causal_lm(model).lm_head.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[:-1].numel()))
    reference, grads = loss_and_grads(lambda: model(**batch, use_cache=False).loss)
    loss, mine = loss_and_grads(lambda: loss_on_labelled_positions(model, dict(batch), count))
    hook.remove()
    assert projected == [batch["input_ids"].numel(), count]  # the head ran on the labelled positions only
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(mine, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def settings(cfg) -> tuple[str, str, str, str]:
    return cfg.model.dtype, cfg.training.precision, cfg.method.quantization.compute_dtype, cfg.model.attn_implementation


def test_auto_picks_bf16_and_flash_attention_where_the_device_has_them():
    cfg = load_config(None, ["method.name=qlora"])
    cpu, chosen = resolve_auto(cfg, DeviceCapabilities(cuda=False, bf16=False, flash_attention=False))
    assert chosen == [
        "model.dtype=float32",
        "training.precision=fp32",
        "method.quantization.compute_dtype=float32",
        "model.attn_implementation=sdpa",
    ]
    assert settings(cpu) == ("float32", "fp32", "float32", "sdpa")
    gpu, _ = resolve_auto(cfg, DeviceCapabilities(cuda=True, bf16=True, flash_attention=True))
    assert settings(gpu) == ("bfloat16", "bf16", "bfloat16", "flash_attention_2")
    # Values set in the config are kept; flash-attention only where the weights are half precision; a config without
    # `auto` left is returned as it was.
    explicit = load_config(None, ["model.dtype=float32", "training.precision=fp32"])
    kept, chosen = resolve_auto(explicit, DeviceCapabilities(cuda=True, bf16=True, flash_attention=True))
    assert settings(kept) == ("float32", "fp32", "float32", "sdpa")  # compute_dtype fixed: LoRA checkpoints compare equal
    assert chosen == ["model.attn_implementation=sdpa"]  # compute_dtype only matters (and is only shown) for QLoRA
    assert resolve_auto(kept, DeviceCapabilities(cuda=True, bf16=True, flash_attention=True)) == (kept, [])
    mixed = load_config(None, ["method.name=qlora", "model.dtype=float16"])
    with pytest.raises(ConfigError, match="auto settings for this device .*training.precision=bf16.*mixes half formats"):
        resolve_auto(mixed, DeviceCapabilities(cuda=True, bf16=True, flash_attention=False))


def test_the_recipe_resolves_auto_for_this_machine_and_shipped_configs_say_auto(tiny_model_dir, tiny_data, tmp_path):
    from conftest import REPO

    settings = {"model.dtype": "auto", "training.precision": "auto"}
    recipe = SFTRecipe(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, tmp_path, **settings)))
    device = DeviceCapabilities.detect()
    assert recipe.cfg.model.dtype == ("bfloat16" if device.bf16 else "float32")
    assert f"model.dtype={recipe.cfg.model.dtype}" in recipe.auto_choices
    for path in sorted((REPO / "configs/smollm2-135m").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.dtype == "auto" and cfg.training.precision == "auto", path
