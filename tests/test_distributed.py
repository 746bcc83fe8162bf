"""Several processes on CPU (gloo) through `accelerate launch`: DDP for several methods, equivalence with one
process, and a failure on one rank ending every rank promptly with that rank named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from ftscale.config import PROMPT_METHODS, load_config
from ftscale.distributed.fsdp import shard_model
from ftscale.distributed.launch import FSDPSettings
from ftscale.methods import attach_adapter, load_adapter
from ftscale.model.loading import causal_lm, decoder_layers, load_base_model
from ftscale.recipes.sft import SFTRecipe

from conftest import REPO, build_tiny_model, tiny_overrides
from helpers import METHOD_SETTINGS, adapter, ddp_cmd, free_port, history, launch_cmd, run

# The README's table of methods x backends. FSDP2 and ZeRO-3 with LoRA and QLoRA are in SHARDED below, which makes
# the same checks on runs it compares with DDP as well.
MATRIX = [
    ("ddp", "lora"),
    ("ddp", "qlora"),
    ("ddp", "prompt_tuning"),
    ("ddp", "bottleneck"),
    ("fsdp2", "prompt_tuning"),
    ("fsdp2", "bottleneck"),
    ("zero2", "lora"),
    ("zero2", "qlora"),
]
BACKEND_NAMES = {"ddp": "MULTI_CPU", "fsdp2": "FSDP2", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
# Threshold 0: ZeRO-3 partitions even the tiny model's weights (by default it keeps small ones whole).
PARTITION_ALL = {"distributed.zero3_persistence_threshold": 0}


def assert_trained_and_reloads(proc, out, backend: str, method: str, settings: dict, model_dir, data, check_dir) -> None:
    """The 2-process run's log names its backend and how the base was held; its held-out loss went down; and the
    saved adapter on the base in one process gives the held-out loss the 2-process model reported at the end."""
    assert f"backend {BACKEND_NAMES[backend]}: 2 processes" in proc.stderr
    local, full = map(int, re.search(r"frozen base: (\d+) of (\d+) bytes held by rank 0", proc.stderr).groups())
    if backend in ("zero3", "fsdp2"):  # the frozen (for QLoRA: 4-bit) base is sharded, not replicated
        assert local <= full // 2 + 4096, (local, full)
    else:
        assert local == full
    if backend == "zero3":  # rank 1 never held the whole base: transformers' zero.Init, or ftscale's for 4-bit
        assert "ZeRO-3: the base was partitioned while loading" in proc.stderr
    if (backend == "fsdp2" and method not in PROMPT_METHODS) or (backend == "zero3" and method == "qlora"):
        assert "rank 0 read the base; 1 other rank(s) received only their shards" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    recipe = SFTRecipe(load_config(None, tiny_overrides(model_dir, data, check_dir, **settings)))
    recipe.setup()
    recipe.model = load_adapter(load_base_model(recipe.cfg, torch.device("cpu")), out / "adapter")
    assert recipe.evaluate()["eval/loss"] == pytest.approx(summary["eval_loss_after"], rel=1e-5)
    recipe.cleanup()


@pytest.mark.parametrize("backend, method", MATRIX, ids=[f"{b}-{m}" for b, m in MATRIX])
def test_trains_and_the_adapter_reloads_in_one_process(backend, method, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    settings = {"method.name": method, "training.max_steps": 4, **PARTITION_ALL, **METHOD_SETTINGS[method]}
    proc = run(launch_cmd(backend, tiny_model_dir, tiny_data, out, **settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trained_and_reloads(proc, out, backend, method, settings, tiny_model_dir, tiny_data, tmp_path / "check")


EQUIVALENCE = {"training.micro_batch_size": 2, "training.max_steps": 5, "training.gradient_accumulation_steps": 2}


@pytest.fixture(scope="module")
def ddp_reference(tiny_data, tmp_path_factory):
    """The DDP run of a method on a model (run once per pair, on first use)."""
    runs = {}

    def reference(method: str, model_dir):
        if (method, model_dir) not in runs:
            out = tmp_path_factory.mktemp(f"ddp-{method}")
            settings = {**EQUIVALENCE, **METHOD_SETTINGS[method], "method.name": method}
            proc = run(launch_cmd("ddp", model_dir, tiny_data, out, **settings))
            assert proc.returncode == 0, proc.stderr[-2000:]
            runs[method, model_dir] = out
        return runs[method, model_dir]

    return reference


SHARDED = [
    ("zero3", "lora", "tied"),
    ("zero3", "qlora", "tied"),
    ("fsdp2", "lora", "tied"),
    ("fsdp2", "qlora", "tied"),
    ("fsdp2", "lora", "untied"),
    ("fsdp2", "prompt_tuning", "untied"),
]


@pytest.mark.parametrize("backend, method, head", SHARDED, ids=[f"{b}-{m}" + ("-untied" if h == "untied" else "") for b, m, h in SHARDED])
def test_sharded_backends_follow_the_ddp_loss_curve(
    backend, method, head, ddp_reference, tiny_model_dir, untied_model_dir, tiny_data, tmp_path
):
    """Same loss curve and adapter as DDP, and the checks of test_trains_and_the_adapter_reloads_in_one_process.
    This also checks that what rank 1 received from rank 0 under memory-efficient loading (4-bit weights and their
    quantisation state included) is the real base. Untied, FSDP2 shards the embedding and the head as units of their
    own; prompt tuning calls the embedding itself, outside the base model's forward."""
    model_dir = untied_model_dir if head == "untied" else tiny_model_dir
    reference = ddp_reference(method, model_dir)
    settings = {**EQUIVALENCE, **METHOD_SETTINGS[method], "method.name": method, **PARTITION_ALL}
    proc = run(launch_cmd(backend, model_dir, tiny_data, tmp_path / backend, **settings))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_trained_and_reloads(proc, tmp_path / backend, backend, method, settings, model_dir, tiny_data, tmp_path / "check")
    torch.testing.assert_close(torch.tensor(history(tmp_path / backend)), torch.tensor(history(reference)), rtol=1e-5, atol=1e-6)
    a, b = adapter(reference), adapter(tmp_path / backend)
    assert a.keys() == b.keys()
    # Adam moves every element by about the learning rate per step whatever its gradient's size, so an element whose
    # gradient is near zero turns reduction-order rounding (ZeRO-3 reduce-scatters in another order than DDP, and not
    # the same order every run) into a difference of a good part of one step in that element alone. Compared as
    # whole tensors: within 0.1% of the tensor's norm.
    for k in a:
        assert torch.linalg.norm(b[k] - a[k]) <= 1e-3 * torch.linalg.norm(a[k]), k


@pytest.mark.parametrize(
    "method, tied", [("lora", False), ("prompt_tuning", False), ("lora", True)], ids=["lora-untied", "prompt_tuning-untied", "lora-tied"]
)
def test_fsdp2_units_are_the_layers_and_the_untied_embedding_and_head(method, tied, tiny_tokenizer):
    """Each decoder layer is an FSDP unit, and so are the input embedding and the output head unless tied: one
    Parameter, which only the root unit can own. The layout needs no second process (FSDP2 over a group of one)."""
    from torch.distributed.fsdp import FSDPModule

    cfg = load_config(None, [f"method.name={method}", "data.packing=false"])
    model = attach_adapter(build_tiny_model(len(tiny_tokenizer), tie=tied), cfg)
    layers = decoder_layers(model)  # found by class name, which sharding changes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        shard_model(model, FSDPSettings(reshard_after_forward=True, offload_params=False, ram_efficient_loading=True), torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in layers)
    inner = causal_lm(model)
    assert isinstance(inner.get_input_embeddings(), FSDPModule) == (not tied)
    assert isinstance(inner.get_output_embeddings(), FSDPModule) == (not tied)


@pytest.mark.parametrize(
    "settings, message",
    [
        ("fsdp_offload_params: true", "offloads FSDP parameters to CPU, but there is no GPU"),
        ("fsdp_version: 1", "selects FSDP version 1: ftscale runs FSDP2; set fsdp_config.fsdp_version: 2"),
    ],
)
def test_impossible_fsdp_settings_fail_before_loading(settings, message, tiny_model_dir, tiny_data, tmp_path):
    key = settings.split(":")[0]
    config = tmp_path / "fsdp.yaml"
    lines = (REPO / "configs/accelerate/fsdp2.yaml").read_text().splitlines()
    config.write_text("\n".join(f"  {settings}" if line.strip().startswith(key + ":") else line for line in lines))
    cmd = launch_cmd("fsdp2", tiny_model_dir, tiny_data, tmp_path / "run")
    cmd[cmd.index("--config_file") + 1] = str(config)
    proc = run(cmd)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr


def test_one_all_reduce_per_optimizer_step(tiny_model_dir, tiny_data, tmp_path):
    """The step's loss sum, token count and checkpoint triggers travel in one all-reduce; an evaluation step adds the
    evaluation's own and one more for the triggers (a signal during the evaluation counts at once). No other
    collective runs per step (the gradient's own reduction is DDP's bucketed C++ path, not counted here).
    Test-only instrumentation through a sitecustomize: count torch.distributed's collectives, note the counts as
    each optimizer step starts."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import json, os\n"
        f"MARKS = {str(tmp_path)!r}\n"
        "if os.environ.get('RANK') in ('0', '1'):\n"
        "    import torch.distributed as dist\n"
        "    import ftscale.recipes.sft as sft\n"
        "    calls = {}\n"
        "    def counted(name, original):\n"
        "        def call(*a, **k):\n"
        "            calls[name] = calls.get(name, 0) + 1\n"
        "            return original(*a, **k)\n"
        "        return call\n"
        "    for name in ('all_reduce', 'all_gather', 'all_gather_object', 'broadcast', 'broadcast_object_list',\n"
        "                 'barrier', 'gather', 'gather_object', 'reduce', 'reduce_scatter', 'scatter', 'all_to_all'):\n"
        "        setattr(dist, name, counted(name, getattr(dist, name)))\n"
        "    original_step = sft.SFTRecipe.train_step\n"
        "    def train_step(self, step):\n"
        "        with open(os.path.join(MARKS, 'steps-' + os.environ['RANK']), 'a') as f:\n"
        "            f.write(json.dumps([step, calls]) + '\\n')\n"
        "        return original_step(self, step)\n"
        "    sft.SFTRecipe.train_step = train_step\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{REPO}"}
    settings = {"training.max_steps": 6, "training.eval_every": 2, "training.gradient_accumulation_steps": 2}
    proc = subprocess.run(
        ddp_cmd(tiny_model_dir, tiny_data, tmp_path / "run", **settings), capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        marks = [json.loads(line) for line in (tmp_path / f"steps-{rank}").read_text().splitlines()]
        assert [step for step, _ in marks] == [0, 1, 2, 3, 4, 5]
        per_step = [
            {op: after.get(op, 0) - before.get(op, 0) for op in set(before) | set(after) if after.get(op, 0) != before.get(op, 0)}
            for (_, before), (_, after) in zip(marks, marks[1:], strict=False)
        ]
        # steps 1..5 (1-based) between the marks; steps 2 and 4 evaluate
        assert per_step == [{"all_reduce": 1}, {"all_reduce": 3}, {"all_reduce": 1}, {"all_reduce": 3}, {"all_reduce": 1}], per_step


def test_a_failure_on_one_rank_ends_every_rank_with_its_message(tiny_model_dir, tiny_data, tmp_path):
    # Test-only fault injection: a sitecustomize that records each rank's pid and breaks rank 1's third forward
    # pass, noting the moment it fails.
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os, time\n"
        f"MARKS = {str(tmp_path)!r}\n"
        "if os.environ.get('RANK') in ('0', '1'):\n"
        "    open(os.path.join(MARKS, 'pid-' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import ftscale.recipes.sft as sft\n"
        "    original = sft.collate\n"
        "    calls = {'n': 0}\n"
        "    def failing(*a, **k):\n"
        "        calls['n'] += 1\n"
        "        if calls['n'] == 5:\n"
        "            open(os.path.join(MARKS, 'failed-at'), 'w').write(repr(time.time()))\n"
        "            raise RuntimeError('injected failure in a batch on rank 1')\n"
        "        return original(*a, **k)\n"
        "    sft.collate = failing\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{REPO}"}
    proc = subprocess.run(
        ddp_cmd(tiny_model_dir, tiny_data, tmp_path / "run", **{"training.max_steps": 20, "distributed.collective_timeout_s": 600}),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    ended = time.time()
    assert proc.returncode != 0
    assert "injected failure in a batch on rank 1" in proc.stderr
    assert "[rank1]" in proc.stderr or "rank: 1" in proc.stderr
    for rank in (0, 1):  # both ranks are gone, not only the launcher
        pid = int((tmp_path / f"pid-{rank}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    after_failure = ended - float((tmp_path / "failed-at").read_text())
    # The healthy rank, blocked in a collective with a 600 s timeout, must not wait for it.
    assert after_failure < 30, f"every rank ended {after_failure:.0f}s after the failure"
