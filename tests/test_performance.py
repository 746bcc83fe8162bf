"""Performance settings that must not change what is learnt: the output head only at labelled positions, dropout
masks drawn in bulk and LoRA's product added inside the base matmul on CPU, and `auto` dtypes, precision and
attention kernel chosen from the device."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from ftscale.config import ConfigError, load_config
from ftscale.data.packing import collate, packed_row
from ftscale.methods import attach_adapter
from ftscale.model.auto_settings import DeviceCapabilities, resolve_auto
from ftscale.model.kernels import FastCPUDropout, FusedCPULoraLinear, use_fast_cpu_dropout, use_fused_cpu_lora
from ftscale.model.loading import causal_lm
from ftscale.model.memory_estimate import ModelShape, estimate_training_memory
from ftscale.recipes.sft import SFTRecipe
from ftscale.training import activation_offload
from ftscale.training.activation_offload import ActivationOffload, Offloaded
from ftscale.training.loss import ChunkedHeadLoss, chunkable_head, loss_on_labelled_positions, supports_labelled_head, training_loss

from conftest import build_tiny_model, tiny_overrides

SHAPE = ModelShape(hidden=576, layers=30, intermediate=1536, vocab=49152, kv_width=192, tied=True)  # SmolLM2-135M's


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
    head = causal_lm(model).lm_head
    hook = head.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[:-1].numel()))
    reference, grads = loss_and_grads(lambda: model(**batch, use_cache=False).loss)
    loss, mine = loss_and_grads(lambda: loss_on_labelled_positions(model, dict(batch), count))
    assert projected == [batch["input_ids"].numel(), count]  # the head ran on the labelled positions only
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(mine, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # In chunks of 3 positions (the batch has 7 to 12): the head itself is handed nothing, the loss does its work.
    assert chunkable_head(model) is head
    loss, mine = loss_and_grads(lambda: ChunkedHeadLoss(head, chunk=3)(model, dict(batch), count))
    hook.remove()
    assert projected[2:] == [0]
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(mine, grads, strict=True):  # summed in another order: fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # outside the loss (evaluation, generation) the head is the plain head again
        torch.testing.assert_close(model(**batch, use_cache=False).loss, reference)


def test_the_chunked_loss_keeps_the_head_bias_and_stands_aside_where_the_logits_are_not_the_head_output(tiny_tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = attach_adapter(build_tiny_model(len(tiny_tokenizer)), load_config(None, []))
    inner = causal_lm(model)
    inner.lm_head = torch.nn.Linear(inner.config.hidden_size, inner.config.vocab_size, bias=True).requires_grad_(False)
    torch.nn.init.normal_(inner.lm_head.bias, std=2.0)  # large enough that dropping it would show
    examples = rows(len(tiny_tokenizer))
    batch_rows = [packed_row([e], packed=False) for e in examples]
    batch = collate(batch_rows, 0, packed=False)
    count = sum(r.loss_tokens for r in batch_rows)
    assert chunkable_head(model) is inner.lm_head
    with torch.no_grad():
        torch.testing.assert_close(ChunkedHeadLoss(inner.lm_head, chunk=4)(model, dict(batch), count), model(**batch).loss)
    # An adapter on the head, or a trained head: the head's own forward must run.
    on_head = attach_adapter(build_tiny_model(len(tiny_tokenizer)), load_config(None, ["method.lora.target_modules=[q_proj,lm_head]"]))
    assert chunkable_head(on_head) is None
    cfg = load_config(None, [])
    assert training_loss(on_head, cfg.training, "lora")[0] is loss_on_labelled_positions
    # Gemma 2 soft-caps its logits after the head.
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    assert supports_labelled_head(gemma) and chunkable_head(gemma) is None


def test_liger_kernels_set_true_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.liger_kernels=true needs a CUDA device and liger-kernel installed"):
        resolve_auto(load_config(None, ["model.liger_kernels=true"]), DeviceCapabilities(False, False, False, memory=2**40), SHAPE)
    cfg, chosen = resolve_auto(load_config(None, []), DeviceCapabilities(False, False, False, memory=2**40), SHAPE)
    assert cfg.model.liger_kernels is False and not any("liger" in c for c in chosen)  # auto: off, and not worth a line on CPU


def settings(cfg) -> tuple[str, str, str, str]:
    return cfg.model.dtype, cfg.training.precision, cfg.method.quantization.compute_dtype, cfg.model.attn_implementation


def test_auto_picks_bf16_and_flash_attention_where_the_device_has_them():
    cfg = load_config(None, ["method.name=qlora"])
    cpu, chosen = resolve_auto(cfg, DeviceCapabilities(cuda=False, bf16=False, flash_attention=False, memory=2**40), SHAPE)
    assert chosen[:4] == [
        "model.dtype=float32",
        "training.precision=fp32",
        "method.quantization.compute_dtype=float32",
        "model.attn_implementation=sdpa",
    ]
    assert chosen[4].startswith("training.gradient_checkpointing=false (estimate ")  # with a terabyte to spare
    assert settings(cpu) == ("float32", "fp32", "float32", "sdpa")
    gpu, _ = resolve_auto(cfg, DeviceCapabilities(cuda=True, bf16=True, flash_attention=True, memory=2**40), SHAPE)
    assert settings(gpu) == ("bfloat16", "bf16", "bfloat16", "flash_attention_2")
    # Values set in the config are kept; flash-attention only where the weights are half precision; a config without
    # `auto` left is returned as it was.
    explicit = load_config(None, ["model.dtype=float32", "training.precision=fp32", "training.gradient_checkpointing=false"])
    kept, chosen = resolve_auto(explicit, DeviceCapabilities(cuda=True, bf16=True, flash_attention=True, memory=2**40), SHAPE)
    assert settings(kept) == ("float32", "fp32", "float32", "sdpa")  # compute_dtype fixed: LoRA checkpoints compare equal
    assert chosen == ["model.attn_implementation=sdpa", "model.liger_kernels=false"]  # compute_dtype only matters (and is shown) for QLoRA
    assert resolve_auto(kept, DeviceCapabilities(cuda=True, bf16=True, flash_attention=True, memory=2**40), SHAPE) == (kept, [])
    mixed = load_config(None, ["method.name=qlora", "model.dtype=float16"])
    with pytest.raises(ConfigError, match="auto settings for this device .*training.precision=bf16.*mixes half formats"):
        resolve_auto(mixed, DeviceCapabilities(cuda=True, bf16=True, flash_attention=False, memory=2**40), SHAPE)


def test_auto_checkpoints_gradients_when_the_estimate_passes_the_memory_a_process_has():
    shape = ModelShape(hidden=2048, layers=16, intermediate=5632, vocab=49152, kv_width=512, tied=False)
    cfg = load_config(None, ["method.name=qlora", "training.micro_batch_size=8", "data.max_seq_len=2048"])
    gpu = DeviceCapabilities(cuda=True, bf16=True, flash_attention=False, memory=80 * 2**30)
    needed = estimate_training_memory(shape, resolve_auto(cfg, gpu, shape)[0], checkpointing=False)
    saved = estimate_training_memory(shape, resolve_auto(cfg, gpu, shape)[0], checkpointing=True)
    assert saved.activations < needed.activations / 5 and saved.base == needed.base and saved.adapter == needed.adapter
    for memory, expected in ((2 * needed.total, False), (needed.total, True)):
        resolved, chosen = resolve_auto(cfg, DeviceCapabilities(cuda=True, bf16=True, flash_attention=False, memory=memory), shape)
        assert resolved.training.gradient_checkpointing is expected
        assert chosen[-1] == f"training.gradient_checkpointing={str(expected).lower()} (estimate {needed.total / 1e9:.2f} GB)"
    # Set in the config, it is kept; peft cannot checkpoint prompt methods, so auto means off for them.
    kept, _ = resolve_auto(load_config(None, ["training.gradient_checkpointing=false"]), DeviceCapabilities(False, False, False), shape)
    assert kept.training.gradient_checkpointing is False
    prompt, chosen = resolve_auto(
        load_config(None, ["method.name=prompt_tuning", "data.packing=false"]), DeviceCapabilities(False, False, False), shape
    )
    assert prompt.training.gradient_checkpointing is False and not any("checkpointing" in c for c in chosen)


@pytest.mark.parametrize(
    "method, dropout, precision",
    [("lora", 0.0, "fp32"), ("lora", 0.1, "fp32"), ("lora", "0.1 fast", "fp32"), ("lora", 0.0, "bf16"), ("dora", 0.0, "fp32")],
)
def test_the_activation_estimate_is_close_to_what_backward_keeps(method, dropout, precision, tiny_tokenizer):
    """Counted with torch's saved-tensor hooks (each storage once) on a Llama-shaped model, fp32 or bf16 weights;
    dropout as torch draws it and as FastCPUDropout does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [f"method.name={method}", f"method.lora.dropout={str(dropout).split()[0]}", "training.micro_batch_size=2", "data.max_seq_len=96"]
        + [f"training.fast_cpu_dropout={str(dropout).endswith('fast')}"]
        + [
            "training.loss_chunk_size=null",
            f"training.precision={precision}",
            f"model.dtype={'bfloat16' if precision == 'bf16' else 'float32'}",
        ],
    )
    cfg, _ = resolve_auto(cfg, DeviceCapabilities(False, False, False, memory=2**40), ModelShape.of(config))
    model = attach_adapter(LlamaForCausalLM(config).to(getattr(torch, cfg.model.dtype)).train(), cfg)
    if str(dropout).endswith("fast"):
        assert use_fast_cpu_dropout(model) == 7 * config.num_hidden_layers
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, len(tiny_tokenizer), (2, 96))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # as the recipe runs it: autocast for bf16
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    logits = ids.numel() * config.vocab_size * 4  # the model's own loss keeps its log-softmax (fp32)
    if precision == "bf16":
        logits += ids.numel() * config.vocab_size * 2  # and, in bf16, the logits it upcast
    measured = sum(n for ptr, n in storages.items() if ptr not in frozen) - logits
    estimate = estimate_training_memory(ModelShape.of(config), cfg, checkpointing=False)
    assert 0.85 < estimate.activations / measured < 1.15


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


def dropout_mask(p: float, shape=(1000, 1000)) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of FastCPUDropout(p) on ones in training mode, the input's gradient through it)."""
    x = torch.ones(shape, requires_grad=True)
    out = FastCPUDropout(p).train()(x)
    out.sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_fast_cpu_dropout_drops_each_element_independently_with_probability_p(p):
    torch.manual_seed(0)
    out, grad = dropout_mask(p)
    kept = out != 0
    scale = 1 / (1 - round(p * 65536) / 65536)
    assert torch.equal(out[kept], torch.full_like(out[kept], scale))  # survivors scaled so the expectation is x
    assert torch.equal(grad, out)  # the gradient goes through the same mask and scale
    tolerance = 5 * (p * (1 - p) / (out.numel() / 4)) ** 0.5  # five sigma on a quarter of the elements
    dropped = ~kept.flatten()
    for lane in range(4):  # each 16-bit lane of a 64-bit draw
        assert abs(dropped[lane::4].float().mean().item() - p) < tolerance, lane
    both = (dropped[:-1] & dropped[1:]).float().mean().item()  # neighbours, within a draw or across draws
    assert abs(both - p * p) < 5 * (p * p / out.numel()) ** 0.5
    assert abs(out.mean().item() - 1) < 0.01


def test_fast_cpu_dropout_follows_the_seed_and_is_inert_outside_training():
    torch.manual_seed(1)
    first, _ = dropout_mask(0.1, (64, 32))
    second, _ = dropout_mask(0.1, (64, 32))
    torch.manual_seed(1)
    again, _ = dropout_mask(0.1, (64, 32))
    assert torch.equal(first, again) and not torch.equal(first, second)
    x = torch.randn(8, 8)
    assert torch.equal(FastCPUDropout(0.5).eval()(x), x)
    assert torch.equal(FastCPUDropout(0.0).train()(x), x)
    for dtype in (torch.bfloat16, torch.float16):
        half = FastCPUDropout(0.5).train()(x.to(dtype))
        assert half.dtype == dtype and set(half.unique().tolist()) <= {0.0} | set((x.to(dtype) * 2).flatten().tolist())
    transposed = FastCPUDropout(0.5).train()(x.t())
    assert torch.equal(transposed[transposed != 0], (2 * x.t())[transposed != 0])
    # p that 2^-16 steps cannot hold within 1% (1e-5 would become 1.5e-5): torch's own dropout, the same draws
    for p in (1e-5, 1 - 1e-6):
        torch.manual_seed(2)
        ours = FastCPUDropout(p).train()(x)
        torch.manual_seed(2)
        assert torch.equal(ours, torch.nn.Dropout(p).train()(x))


def test_fast_cpu_dropout_leaves_compiled_graphs_whole():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), FastCPUDropout(0.1), torch.nn.Linear(8, 8)).train()
    assert torch._dynamo.explain(model)(torch.randn(4, 8)).graph_break_count == 0


def test_the_recipe_draws_dropout_in_bulk_and_fuses_lora_on_cpu_unless_told_not_to(tiny_model_dir, tiny_data, tmp_path):
    from peft.tuners.lora.layer import Linear as LoraLinear

    for fast, dropout, linear in ((True, FastCPUDropout, LoraLinear), (False, torch.nn.Dropout, FusedCPULoraLinear)):
        settings = {"method.lora.dropout": 0.1, "training.fast_cpu_dropout": fast, "training.fused_cpu_lora": not fast}
        recipe = SFTRecipe(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, tmp_path / str(fast), **settings)))
        recipe.setup()
        assert {type(m) for m in recipe.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0} == {dropout}
        assert {type(m) for m in recipe.model.modules() if isinstance(m, LoraLinear)} == {linear}
        recipe.cleanup()


def lora_model(tiny_tokenizer, settings: list[str], bias: bool = False):
    """A tiny Llama (with biases in every projection, if asked) and its adapter, initialised so B is not zero."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(len(tiny_tokenizer), intermediate=96, attention_bias=bias, mlp_bias=bias)
    cfg = load_config(None, settings)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=cfg.method.lora.dropout,
        target_modules="all-linear",
        use_dora=cfg.method.name == "dora",
        init_lora_weights=False,
    )
    return get_peft_model(base, lora).train()


def loss_and_grads(model, ids: torch.Tensor, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks for both forwards
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b) -> None:
    assert torch.allclose(a[0], b[0], rtol=1e-5, atol=1e-6), (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("dropout", ["0.0", "0.1 torch", "0.1 fast"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_cpu_lora_learns_what_peft_learns_with_the_same_masks(dropout, bias, tiny_tokenizer, monkeypatch):
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = lora_model(tiny_tokenizer, [f"method.lora.dropout={dropout.split()[0]}"], bias)
    if dropout.endswith("fast"):
        use_fast_cpu_dropout(model)
    ids = torch.randint(3, len(tiny_tokenizer), (2, 24))
    peft_own = loss_and_grads(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    lora_b = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features > 4 and m.in_features == 4]
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in lora_b]
    loss_and_grads(model, ids)
    assert len(calls) == len(lora_b) == 14  # peft's forward calls every lora_B
    for hook in hooks:
        hook.remove()
    assert use_fused_cpu_lora(model) == 14
    assert model.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fused_layers = []
    plain_adapter = FusedCPULoraLinear._plain_adapter
    monkeypatch.setattr(
        FusedCPULoraLinear, "_plain_adapter", lambda self, x: fused_layers.append(plain_adapter(self, x)) or fused_layers[-1]
    )
    fused = loss_and_grads(model, ids)
    assert fused_layers == ["default"] * 14  # every layer took the fused path
    assert_same(fused, peft_own)
    if dropout != "0.0":  # another seed, other masks: the fused forward does draw them
        assert not torch.allclose(loss_and_grads(model, ids, seed=4)[0], fused[0])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        for layer in model.modules():
            if isinstance(layer, FusedCPULoraLinear):
                layer.__class__ = LoraLinear
        assert torch.allclose(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)  # in eval, as peft's
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, logits)  # where the adapter does count


def test_fused_cpu_lora_leaves_what_it_cannot_fuse_to_peft(tiny_tokenizer):
    from peft import LoraConfig

    ids = torch.randint(3, len(tiny_tokenizer), (2, 16))
    # DoRA (a variant): peft's own forward, the same result
    dora = lora_model(tiny_tokenizer, ["method.name=dora", "method.lora.dropout=0.1"])
    expected = loss_and_grads(dora, ids)
    assert use_fused_cpu_lora(dora) == 14
    assert_same(loss_and_grads(dora, ids), expected)

    model = lora_model(tiny_tokenizer, ["method.lora.dropout=0.1"])
    use_fast_cpu_dropout(model)  # whose unscaled() the fused forward calls, not the module
    use_fused_cpu_lora(model)
    layer = next(m for m in model.modules() if isinstance(m, FusedCPULoraLinear))
    x = torch.randn(2, 5, 64)
    seen = []
    # A hook on lora_B (where DeepSpeed ZeRO-3 gathers a partitioned weight) must run: peft's forward calls the module.
    hook = layer.lora_B["default"].register_forward_hook(lambda m, i, o: seen.append("lora_B"))
    layer(x)
    hook.remove()
    # A hook that keeps the base layer's output must see it unchanged: the in-place add is not done after it.
    hook = layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.clone()) or seen.append(o))
    layer.eval()(x)
    hook.remove()
    assert seen[0] == "lora_B" and torch.equal(seen[1], seen[2])
    assert type(layer(x).grad_fn).__name__ == "ViewBackward0" and type(layer(x).grad_fn.next_functions[0][0]).__name__ == "AddmmBackward0"
    # Hooks that calling the modules would run: on the dropout, or global ones (a global backward pre-hook would
    # also make the base output a view that the in-place add may not change)
    hook = layer.lora_dropout["default"].register_forward_hook(lambda *_: seen.append("dropout"))
    layer.train()(x)
    hook.remove()
    hook = torch.nn.modules.module.register_module_full_backward_pre_hook(lambda *_: seen.append("backward"))
    try:
        layer(x.clone().requires_grad_()).sum().backward()
    finally:
        hook.remove()
    assert seen[3:] == ["dropout"] + ["backward"] * 5  # the layer, lora_B, lora_A, the dropout and the base
    # Two active adapters: peft's forward, with both products; a lora_B with a bias (peft's lora_bias) or a base
    # layer of another class: peft's forward
    model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    layer.eval()
    with torch.no_grad():
        parts = {}
        for name in ("default", "second"):
            layer.set_adapter(name)
            parts[name] = layer(x) - layer.base_layer(x)
        layer.set_adapter(["default", "second"])
        assert torch.allclose(layer(x) - layer.base_layer(x), parts["default"] + parts["second"], atol=1e-6)
        layer.set_adapter("default")
        assert layer._plain_adapter(x) == "default"
        layer.lora_B["default"].bias = torch.nn.Parameter(torch.ones(layer.out_features))
        assert layer._plain_adapter(x) is None
        layer.lora_B["default"].bias = None
        layer.base_layer.__class__ = type("AnotherLinear", (torch.nn.Linear,), {})  # whose forward may differ
        assert layer._plain_adapter(x) is None
        layer.base_layer.__class__ = torch.nn.Linear
    # Merged into the base, disabled, or under autocast: peft's forward, which adds nothing twice
    with torch.no_grad():
        unmerged = layer.eval()(x)
        layer.merge()
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
        layer.unmerge()
        layer.enable_adapters(False)
        assert torch.equal(layer(x), layer.base_layer(x))
        layer.enable_adapters(True)
        with torch.autocast("cpu", torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert layer._plain_adapter(x) == "default" and layer._plain_adapter(x.double()) is None


def test_activation_offloading_moves_every_saved_activation_but_no_weight_and_changes_nothing(tiny_tokenizer):
    model = attach_adapter(build_tiny_model(len(tiny_tokenizer)), load_config(None, ["method.name=dora"]))
    ids = torch.randint(3, len(tiny_tokenizer), (2, 40))
    trainable = [p for p in model.parameters() if p.requires_grad]
    moved, kept = [], []

    class Recorded(ActivationOffload):
        def _pack(self, tensor):
            packed = super()._pack(tensor)
            (moved if isinstance(packed, Offloaded) else kept).append(tensor)
            return packed

    def loss_and_grads(context):
        model.zero_grad()
        with context:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in trainable]

    reference = loss_and_grads(contextlib.nullcontext())
    offload = Recorded(smallest=0)
    assert all(torch.equal(a, b) for a, b in zip(reference, loss_and_grads(offload), strict=True))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert moved and not any(t.untyped_storage().data_ptr() in weights for t in moved)
    assert kept and all(t.untyped_storage().data_ptr() in weights or t.numel() == 0 for t in kept)  # the weights only
    small = ActivationOffload()  # the default leaves spans under 1 MiB alone: all of this tiny model's
    loss_and_grads(small)
    assert small.offloaded_bytes == 0


def test_activation_offloading_moves_what_a_tensor_spans_once_and_rebuilds_its_strides():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    row = torch.randn(1, 1000)
    x = torch.randn(5, 64, requires_grad=True)

    def loss():
        y = x @ weight  # saves x and a view of the weight
        shared = y * 3
        twice = (shared * weight[0]).sum() + (shared * weight[1]).sum()
        inner = (shared[1:, 3:] ** 2).sum()  # a view that starts inside its storage
        return (x.sum(1, keepdim=True) * row.expand(5, 1000)).sum() + twice + (shared.t()[::2] ** 2).sum() + inner

    loss().backward()
    expected, x.grad = x.grad.clone(), None
    offload = ActivationOffload(smallest=0)
    with offload:
        value = loss()
    value.backward()
    assert torch.equal(x.grad, expected)
    # x (5 x 64) saved by the matmul; row's 1000 floats under its expanded view (not 5 x 1000); `shared` once
    # although two ops save it; its transposed every-other-row view from its first element to its last (31 x 2 +
    # 4 x 64 + 1 floats); its [1:, 3:] view from element 67 to the last (5 x 64 - 67); no byte of the weight.
    assert offload.offloaded_bytes == 4 * (5 * 64 + 1000 + 5 * 64 + 31 * 2 + 4 * 64 + 1 + 5 * 64 - 67)
    # A slice of a much larger buffer moves its own elements, not the buffer's span between them.
    buffer = torch.randn(64, 300, requires_grad=True)
    sliced = ActivationOffload(smallest=0)
    with sliced:
        columns = buffer[:, :10] * 1
        value = (columns**2).sum()
    value.backward()
    assert sliced.offloaded_bytes == 4 * 64 * 10
    assert torch.equal(buffer.grad[:, :10], 2 * buffer.detach()[:, :10]) and not buffer.grad[:, 10:].any()


def test_the_recipe_offloads_every_micro_batch_and_learns_the_same(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    contexts = []

    class Recorded(ActivationOffload):
        def __init__(self):
            super().__init__(smallest=0)
            contexts.append(self)

    monkeypatch.setattr(activation_offload, "ActivationOffload", Recorded)
    losses = []
    for offload in (False, True):
        settings = {"training.max_steps": 3, "training.gradient_accumulation_steps": 2}
        recipe = SFTRecipe(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, tmp_path / str(offload), **settings)))
        recipe.cfg.training.activation_offloading = offload  # after the CUDA check, which this CPU fails
        recipe.setup()
        recipe.train()
        recipe.cleanup()
        losses.append([h["train/loss"] for h in recipe.history if "train/loss" in h])
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert len(contexts) == 3 * 2 and all(c.offloaded_bytes > 0 for c in contexts)


def test_activation_offloading_needs_cuda_and_spares_the_estimate_all_layers_but_one():
    with pytest.raises(ConfigError, match="training.activation_offloading"):
        resolve_auto(load_config(None, ["training.activation_offloading=true"]), DeviceCapabilities(False, False, False), SHAPE)
    # fp32 weights under bf16 autocast: each frozen weight's cast copy would be offloaded as if it were an activation
    fp32_weights = ["training.activation_offloading=true", "model.dtype=float32", "training.precision=bf16"]
    with pytest.raises(ConfigError, match="model.dtype=float32 under training.precision=bf16"):
        resolve_auto(load_config(None, fp32_weights), DeviceCapabilities(True, True, False, memory=2**40), SHAPE)
    settings = ["training.micro_batch_size=8", "data.max_seq_len=2048", "model.dtype=bfloat16", "training.precision=bf16"]
    kept = estimate_training_memory(SHAPE, load_config(None, settings), checkpointing=False)
    offloaded = estimate_training_memory(SHAPE, load_config(None, [*settings, "training.activation_offloading=true"]), checkpointing=False)
    assert offloaded.activations * SHAPE.layers == kept.activations
    # A GPU that cannot hold the activations: auto checkpoints them, unless they are offloaded.
    gpu = DeviceCapabilities(True, True, False, memory=int(kept.total * 0.8))
    cfg = ["model.dtype=auto", "training.precision=auto", "training.gradient_checkpointing=auto", *settings[:2]]
    assert resolve_auto(load_config(None, cfg), gpu, SHAPE)[0].training.gradient_checkpointing is True
    offload = resolve_auto(load_config(None, [*cfg, "training.activation_offloading=true"]), gpu, SHAPE)[0]
    assert offload.training.gradient_checkpointing is False


REUSE_PROBE = """
import resource, sys, torch
from ftscale.distributed.launch import read_launch_settings
from ftscale.training.host_memory import reuse_freed_host_memory
done = reuse_freed_host_memory(read_launch_settings().allocator) if sys.argv[1] == "reuse" else "default"
def step():
    for _ in range(10):
        torch.ones(2**24).sum()  # 64 MiB allocated, written and freed, as a step's activations are
step()  # the first step grows the heap either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, done)
"""


def test_reusing_host_memory_stops_page_faulting_each_big_tensor_in_afresh():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}

    def faults(mode: str, **extra: str) -> tuple[int, str]:
        out = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], env={**env, **extra}, capture_output=True, text=True, check=True)
        count, done = out.stdout.split(" ", 1)
        return int(count), done.strip()

    default, _ = faults("default")
    reused, done = faults("reuse")
    # glibc maps each 64 MiB tensor afresh, so its pages fault every time; the heap keeps them (whatever the page size)
    assert reused < default / 10, (reused, default, done)
    assert "keeps freed memory" in done
    # The user's own allocator settings win: nothing changes, and the log says why.
    faulted, done = faults("reuse", MALLOC_MMAP_THRESHOLD_="131072")
    assert faulted > default / 2 and "MALLOC_MMAP_THRESHOLD_" in done
