"""Observability: the metrics of every logged step in metrics.jsonl and in the offline W&B run file (read back
with wandb's protobuf classes), across a preemption and resume; FLOPs and MFU; the console; `ftscale report`."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from ftscale.checkpoint import REQUEUE_EXIT_CODE
from ftscale.cli import main as cli_main
from ftscale.config.data import DataConfig, DataSource
from ftscale.config.model import ModelConfig
from ftscale.data import tokenize_sources
from ftscale.data.sampler import StepTotals
from ftscale.data.tokenize import count_loss_tokens
from ftscale.methods import attach_adapter
from ftscale.model.loading import load_tokenizer
from ftscale.observability.console import ConsoleProgress
from ftscale.observability.flops import ModelFlops, measured_matmul_flops, model_flops, table_peak
from ftscale.observability.metrics_file import MetricsFile, read_metrics
from ftscale.observability.step_metrics import LocalStep, MetricsWindow, reduce_step

from conftest import REPO, build_tiny_model, tiny_overrides
from helpers import run, train_cmd
from wandb_records import config, history, records

SETTINGS = {
    "training.max_steps": 12,  # one epoch: 24 packed rows, 2 a step
    "training.eval_every": 3,
    "training.log_every": 2,
    "training.eval_generate_examples": 4,
    "training.eval_generate_max_tokens": 8,
    "checkpoint.every_steps": 4,
    "logging.console": True,
    "logging.wandb.mode": "offline",
    "logging.wandb.tags": "[smoke, tiny]",
    "logging.wandb.group": "observability",
    "logging.wandb.notes": "a test run",
    "logging.wandb.log_adapter": True,
}
TRAIN_KEYS = {
    "train/loss", "train/lr", "train/grad_norm", "train/step_time_s",
    "perf/tokens_per_s", "perf/tokens_per_s_per_device", "perf/loss_tokens_per_s", "perf/samples_per_s",
    "perf/padding_fraction", "perf/mfu", "perf/mfu_6n",
    "data/wait_s", "data/epoch", "data/examples_seen",
    "health/step_time_slowest_s", "health/step_time_fastest_s", "health/slowest_rank", "health/nonfinite_losses",
    "health/nonfinite_grad_norms", "mem/host_rss_gb", "mem/host_rss_rank",
    "time/train_s", "time/eval_s", "time/checkpoint_s", "time/logging_s", "time/data_wait_s",
}  # fmt: skip
EVAL_STEPS = [0, 3, 6, 9, 12]


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory, tiny_model_dir, tiny_data):
    """A run stopped by SIGUSR1 after its step-4 checkpoint and resumed to the end, with an API key in its
    environment. Returns (output folder, the key, the preempted step, both runs' stderr)."""
    out = tmp_path_factory.mktemp("observed") / "observed"
    key = secrets.token_hex(20)
    env = {**os.environ, "WANDB_API_KEY": key}
    cmd = train_cmd(tiny_model_dir, tiny_data, out, **SETTINGS)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 300
    while not (out / "checkpoints/step-00000004").exists():
        assert proc.poll() is None and time.monotonic() < end, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-3000:]
    stopped = int(re.search(r"stopped after step (\d+)", stderr).group(1))
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, key, stopped, (stderr, resumed.stderr)


def expected_steps(stopped: int) -> list[int]:
    """Log steps: every log_every, every evaluation, the last step and the step a preemption stopped at."""
    return sorted({0, *range(2, 13, 2), *EVAL_STEPS, stopped})


def test_metrics_jsonl_is_the_true_history_across_a_preemption(preempted_run, tiny_model_dir, tiny_data):
    out, _, stopped, _ = preempted_run
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == expected_steps(stopped)
    for r in lines:
        assert ("eval/loss" in r and "eval/exact_match" in r) == (r["step"] in EVAL_STEPS), r
        if r["step"]:
            assert r.keys() >= TRAIN_KEYS, TRAIN_KEYS - r.keys()
            assert r["health/nonfinite_losses"] == 0 and r["health/slowest_rank"] == 0 and r["mem/host_rss_gb"] > 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert lines[0]["eval/loss"] == summary["eval_loss_before"] and lines[-1]["eval/loss"] == summary["eval_loss_after"]
    assert [h["step"] for h in summary["history"] if "eval/loss" in h] == EVAL_STEPS  # evaluations are in the history too

    # Rates are real tokens over training time: over the one epoch, rate x time adds up to the data's own counts,
    # counted here by the in-memory tokenizer path, not the token store the run read.
    tok, _ = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    examples, _ = tokenize_sources([DataSource(path=str(tiny_data["train"]))], DataConfig(max_seq_len=256), tok)
    train = [r for r in lines if r["step"]]

    def total(rate):
        return sum(r[rate] * r["time/train_s"] for r in train)

    assert total("perf/tokens_per_s") == pytest.approx(sum(len(e.input_ids) for e in examples), rel=1e-9)
    assert total("perf/loss_tokens_per_s") == pytest.approx(sum(count_loss_tokens(e.labels) for e in examples), rel=1e-9)
    assert total("perf/samples_per_s") == pytest.approx(len(examples), rel=1e-9)
    assert train[-1]["data/examples_seen"] == len(examples) and train[-1]["data/epoch"] == 1.0
    assert all(0 < r["perf/padding_fraction"] < 0.5 for r in train)  # packed rows padded to the longest in a batch
    # Evaluation and checkpoint time are counted apart from training time.
    assert sum(r["time/checkpoint_s"] for r in lines) > 0 and all(r["time/eval_s"] > 0 for r in lines if r["step"] in EVAL_STEPS[:-1])

    # MFU: the PEFT formula, recomputed from the model's shape and the examples' lengths against the logged peak.
    # The peak as each process logged it (tiny runs set logging.peak_flops; measured ones differ per process).
    peaks = [float(re.search(r"MFU is against \S+ FLOP/s per device \(.*?\), (\S+) in all", e).group(1)) for e in preempted_run[3]]
    assert all("(logging.peak_flops)" in e for e in preempted_run[3])
    trainable = int(re.search(r"(\d+) trainable of", preempted_run[3][1]).group(1))
    hidden, inter, layers, vocab = 64, 128, 2, len(tok)
    frozen = layers * (hidden * hidden * 2 + hidden * hidden // 2 * 2 + 3 * hidden * inter) + hidden * vocab
    tokens = sum(len(e.input_ids) for e in examples)
    context = sum(len(e.input_ids) * (len(e.input_ids) + 1) // 2 for e in examples)  # within each example only
    loss_tokens = sum(count_loss_tokens(e.labels) for e in examples)
    head = hidden * vocab  # the output head runs at labelled positions only (training.head_on_labels_only)
    flops = (4 * (frozen - head) + 6 * trainable) * tokens + 4 * head * loss_tokens + 12 * layers * hidden * context
    achieved = sum(r["perf/mfu"] * r["time/train_s"] * peaks[r["step"] > stopped] for r in train)
    assert achieved == pytest.approx(flops, rel=1e-9)
    assert all(r["perf/mfu_6n"] > r["perf/mfu"] for r in train)


def test_the_wandb_run_file_holds_every_metric_at_its_step_across_the_resume(preempted_run):
    out, key, stopped, _ = preempted_run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    run_id = (out / "wandb-run-id").read_text()
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run, continued
    files = [next(r.glob("*.wandb")) for r in runs]
    logged = [row for f in files for row in history(f)]
    assert [row["_step"] for row in logged] == expected_steps(stopped)  # the step axis continues across the resume
    by_step = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    for row in logged:
        line = by_step[row["_step"]]
        assert {k for k in row if not k.startswith("_")} == {k for k in line if k not in ("step", "time")}
        assert all(row[k] == pytest.approx(line[k], rel=1e-12) for k in line if k not in ("step", "time"))

    cfg = config(files[-1])
    assert cfg["training"]["eval_every"] == 3 and cfg["run"]["world_size"] == 1 and cfg["run"]["device_type"] == "cpu"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", cfg["run"]["git_commit"]) and cfg["run"]["packages"]["torch"] == torch.__version__
    (run_record,) = [r.run for r in records(files[-1]) if r.WhichOneof("record_type") == "run"]
    assert list(run_record.tags) == ["smoke", "tiny"] and run_record.run_group == "observability" and run_record.notes == "a test run"
    artifacts = [r.artifact for r in records(files[-1]) if r.WhichOneof("record_type") == "artifact"]
    assert [(a.name, a.type) for a in artifacts] == [(f"adapter-{run_id}", "model")]
    assert {f.path for f in artifacts[0].manifest.contents} >= {"adapter_model.safetensors", "adapter_config.json"}
    # The API key in the environment is written nowhere.
    for path in out.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_a_fresh_start_in_the_same_folder_is_a_new_wandb_run(preempted_run, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "observed"
    shutil.copytree(preempted_run[0], out, symlinks=True)
    run_id = (out / "wandb-run-id").read_text()
    settings = {**SETTINGS, "training.max_steps": 2, "logging.wandb.log_adapter": False, "training.eval_generate_examples": 0}
    fresh = run(train_cmd(tiny_model_dir, tiny_data, out, **{**settings, "checkpoint.resume": "none"}))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert (out / "wandb-run-id").read_text() != run_id
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 2]  # the earlier run's lines moved aside
    assert len(list(out.glob("metrics.superseded-*.jsonl"))) == 1
    # An auto-resume that finds no checkpoint in an old output folder is a fresh run too.
    shutil.rmtree(out / "checkpoints")
    second = run(train_cmd(tiny_model_dir, tiny_data, out, **settings))
    assert second.returncode == 0, second.stderr[-2000:]
    ids = [r.name.rsplit("-", 1)[1] for r in sorted((out / "wandb").glob("offline-run-*"))]
    assert len(ids) == 4 and len(set(ids)) == 3 and ids.count(run_id) == 2  # only the resumed pair shares a run


def test_the_console_eta_uses_this_process_rate_after_a_resume(preempted_run):
    stderr = preempted_run[3][1]
    assert re.search(r"step 8/12  train/loss=\S+ .* perf/tokens_per_s=\S+  perf/mfu=\S+ .* eta=\d+m\d\ds", stderr)  # plain lines
    progress = ConsoleProgress(total=1000, start_step=900, interactive=False)
    time.sleep(0.2)
    assert 0.2 / 10 * 90 <= progress.eta_s(910) <= 3 * 0.2 / 10 * 90  # 10 steps in 0.2 s, 90 to go (not 910 steps' rate)


def test_report_draws_every_panel_and_sums_what_metrics_jsonl_holds(preempted_run, tmp_path, capsys):
    out = preempted_run[0]
    lines = read_metrics(out / "metrics.jsonl")
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps({**r, "train/loss": r.get("train/loss", 0) + 1}) + "\n" for r in lines))
    assert cli_main(["report", str(out), str(other), "--out", str(tmp_path / "report")]) == 0
    image = imread(tmp_path / "report/report.png")[:, :, :3]
    assert image.shape[:2] == (800, 1500)
    for row in range(2):
        for col in range(3):
            cell = image[row * 400 + 40 : (row + 1) * 400 - 40, col * 500 + 60 : (col + 1) * 500 - 20]
            colored = (cell.max(axis=2) - cell.min(axis=2)) > 0.3  # plot lines and bars, not text or grid
            assert colored.sum() > 300, f"panel {row},{col} is blank"
    md = (tmp_path / "report/report.md").read_text()
    run_row = next(line for line in md.splitlines() if line.startswith(f"| {out.name} |")).split(" | ")
    train = [r for r in lines if "train/loss" in r]
    assert run_row[2] == f"{train[-1]['train/loss']:.4g}" and run_row[3] == f"{lines[0]['eval/loss']:.4g}"
    assert run_row[4] == f"{lines[-1]['eval/loss']:.4g}"
    other_row = next(line for line in md.splitlines() if line.startswith("| other |")).split(" | ")
    assert other_row[2] == f"{train[-1]['train/loss'] + 1:.4g}"
    train = [r for r in lines if "time/train_s" in r]
    train_s = sum(r["time/train_s"] for r in train)
    assert float(run_row[6]) == pytest.approx(sum(r["perf/tokens_per_s"] * r["time/train_s"] for r in train) / train_s, rel=1e-3)
    assert float(run_row[7]) == pytest.approx(100 * sum(r["perf/mfu"] * r["time/train_s"] for r in train) / train_s, rel=1e-3)
    assert float(run_row[8]) == pytest.approx(max(r["mem/host_rss_gb"] for r in train), rel=1e-3)
    split = next(line for line in md.split("## Where the time went")[1].splitlines() if line.startswith(f"| {out.name} |"))
    seconds = [float(s) for s in re.findall(r"([\d.]+) s \(", split)]
    waited = sum(r["time/data_wait_s"] for r in train)
    expected = [train_s - waited, waited, *(sum(r[f"time/{k}_s"] for r in lines) for k in ("eval", "checkpoint", "logging"))]
    assert seconds == pytest.approx(expected, abs=0.051)  # printed to 0.1 s
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (other / "metrics.jsonl").write_text('{"step": 1, "train/loss": "x"}\n')
    assert cli_main(["report", str(other)]) == 2
    assert "metrics.jsonl: step 1: train/loss is 'x', not a number" in capsys.readouterr().err
    assert cli_main(["report", str(out), "--out", str(out / "metrics.jsonl")]) == 2
    assert "is a file" in capsys.readouterr().err


# ---- components --------------------------------------------------------------------------------------------------


def test_metrics_file_keeps_lines_up_to_the_resumed_step_and_sets_an_old_run_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(7)) + '{"step": 7, "tr')
    MetricsFile(path, resumed_step=4).close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4]
    f = MetricsFile(path, resumed_step=None)  # a fresh run in the same folder
    f.write(0, {"eval/loss": 2.0})
    assert [json.loads(line) for line in path.read_text().splitlines()][0]["eval/loss"] == 2.0  # flushed at once
    f.close()
    (aside,) = tmp_path.glob("metrics.superseded-*.jsonl")
    assert [r["step"] for r in read_metrics(aside)] == [0, 1, 2, 3, 4]


def test_one_vector_carries_sums_and_every_ranks_own_values():
    """Two ranks' step figures through the same summing all-reduce the recipe uses: sums add, per-rank values keep
    their rank, so the window names the slowest rank and the largest memory."""
    vectors = []
    for rank, (compute, loss) in enumerate(((0.5, 10.0), (2.0, 30.0))):
        local = LocalStep(torch.tensor(loss, dtype=torch.float64), torch.tensor(rank), 100, 0.1 * (rank + 1), 1.0, compute)
        reduce_step(local, (rank == 1, False), rank, 2, torch.device("cpu"), lambda v: vectors.append(v) or v)
    summed = vectors[0] + vectors[1]
    step = reduce_step(
        LocalStep(torch.tensor(0.0), torch.tensor(0), 0, 0, None), (False, False), 0, 2, torch.device("cpu"), lambda v: summed
    )
    assert (step.loss_sum, step.nonfinite, step.batch_tokens, step.preempted) == (40.0, 1, 200, True)
    assert step.per_rank["compute_s"][1] == 2.0 and step.per_rank["data_wait_s"][0] == pytest.approx(0.1)
    window = MetricsWindow(ModelFlops(0, 0, 0, 0), 1e9, 2, 10, 0)
    window.add_step(step, StepTotals(tokens=150, loss_tokens=40, examples=3, attention_context=0), 2.5, 1e-4, 1.0)
    window.add_time("eval", 100.0)
    record = window.record(1)
    assert record["perf/tokens_per_s"] == 60 and record["perf/padding_fraction"] == 0.25  # eval time left out
    assert record["health/slowest_rank"] == 1 and record["health/step_time_slowest_s"] == 2.0
    assert record["health/nonfinite_losses"] == 1 and record["train/loss"] == 1.0 and record["time/eval_s"] == 100.0
    assert window.record(1) == {"time/eval_s": 0.0, "time/checkpoint_s": 0.0, "time/logging_s": 0.0}  # a new window


def test_flops_count_each_matmul_once_and_the_cpu_peak_is_measured(tiny_tokenizer):
    from ftscale.config import load_config

    model = build_tiny_model(len(tiny_tokenizer)).requires_grad_(False)
    base = model_flops(model, model.config, 0)
    assert base.frozen == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 64 * len(tiny_tokenizer)
    tuned = attach_adapter(model, load_config(None, ["method.name=lora"]))
    counted = model_flops(tuned, model.config, sum(p.numel() for p in tuned.parameters() if p.requires_grad))
    assert counted.frozen == base.frozen and counted.trainable > 0  # peft's wrappers are not counted again
    assert counted.step(10, 4, 55) == 10 * (4 * base.frozen + 6 * counted.trainable) + 12 * 2 * 64 * 55
    assert counted.head == 64 * len(tiny_tokenizer)
    only = model_flops(tuned, model.config, counted.trainable, head_on_labels_only=True)
    assert counted.step(10, 4, 55) - only.step(10, 4, 55) == 4 * counted.head * (10 - 4)  # the head skipped 6 positions
    assert 1e8 < measured_matmul_flops(0.05, 256) < 1e13
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A10": 125e12}
    assert {n: table_peak(n) for n in names} == names and table_peak("NVIDIA RTX A1000") is None  # not the A10's


def test_packed_rows_get_no_attention_credit_across_their_examples(tiny_model_dir, tmp_path):
    """A row's attention context is summed per example (n(n+1)/2 each), not over the row as one sequence."""
    from ftscale.data.dataset import open_stores
    from ftscale.data.rows import StoreRows

    rows = [{"prompt": f"question {i} " * (1 + i), "completion": "answer"} for i in range(5)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=[DataSource(path=str(path))], max_seq_len=512, cache_dir=str(tmp_path / "cache"))
    (store,) = open_stores(cfg.train, cfg, load_tokenizer(ModelConfig(path=str(tiny_model_dir)))[0], 0)
    lengths = np.asarray(store.lengths, np.int64)
    packed = StoreRows([store], np.arange(5), np.array([0, 2, 5]), packed=True)
    assert packed.row_tokens.tolist() == [lengths[:2].sum(), lengths[2:].sum()] and packed.row_examples.tolist() == [2, 3]
    assert packed.row_context.tolist() == [(lengths[:2] * (lengths[:2] + 1) // 2).sum(), (lengths[2:] * (lengths[2:] + 1) // 2).sum()]
    row = packed[1]
    assert packed.row_context[1] == int((row.position_ids + 1).sum())  # what the attention kernel sees per example


def test_no_host_synchronisation_per_micro_batch(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """Calls that make the host wait for the device (item, float, bool, tolist...) made by ftscale's own code during an
    optimizer step do not grow with the number of micro-batches. (transformers' mask code makes one per forward.)"""
    from ftscale.config import load_config
    from ftscale.recipes.sft import SFTRecipe

    package = str(REPO / "ftscale")
    calls: list[str] = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                calls.append(name)
            return original(self, *args, **kwargs)

        return call

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    per_step, forwards = {}, {}
    for accumulation in (1, 4):
        settings = {"training.micro_batch_size": 1, "training.gradient_accumulation_steps": accumulation}
        recipe = SFTRecipe(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, tmp_path / str(accumulation), **settings)))
        recipe.setup()
        recipe.model.train()
        seen = []
        recipe.model.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        calls.clear()
        recipe.train_step(0)
        per_step[accumulation], forwards[accumulation] = list(calls), len(seen)
        recipe.cleanup()
    assert forwards == {1: 1, 4: 4}
    assert per_step[4] == per_step[1] and len(per_step[1]) <= 1, per_step  # the gradient norm, once a step


def test_a_diverged_run_logs_its_nonfinite_losses_before_it_stops(tiny_model_dir, tiny_data, tmp_path):
    from ftscale.config import load_config
    from ftscale.recipes.sft import TrainingDiverged, recipe_main

    out = tmp_path / "run"
    settings = {"training.learning_rate": 1e30, "training.max_grad_norm": "null", "training.log_every": 100}
    with pytest.raises(TrainingDiverged, match="loss became nan at step"):
        recipe_main(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, out, **settings)))
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert last["step"] > 0 and last["health/nonfinite_losses"] > 0  # logged although no log step was due
    assert last["train/loss"] is None  # NaN is written as null: metrics.jsonl stays strict JSON


def test_the_progress_bar_counts_from_the_resumed_step_and_keeps_log_lines_above_it(capsys):
    progress = ConsoleProgress(total=10, start_step=4, interactive=True)
    progress.step_done()
    progress.show(5, {"train/loss": 1.25, "perf/tokens_per_s": 300.0, "other": 1.0})
    logging.getLogger("ftscale").warning("a log line")
    progress.close()
    err = capsys.readouterr().err
    assert " 5/10 " in err and "loss=1.25" in err and "tokens_per_s=300" in err and "other" not in err


def test_exact_match_prompts_end_where_the_last_answer_starts(tiny_model_dir, tmp_path):
    """The in-training exact match asks each held-out example's prompt (everything before its last answer) and
    compares with that answer, decoded: multi-turn chats keep their earlier turns in the prompt."""
    from ftscale.data.dataset import open_stores
    from ftscale.data.rows import StoreRows
    from ftscale.evaluation.generation import prompts_and_answers

    chats = [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [
            {"role": "user", "content": "capital of France?"},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "and of Italy?"},
            {"role": "assistant", "content": "Rome"},
        ],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    tok, _ = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    cfg = DataConfig(train=[DataSource(path=str(path))], max_seq_len=512, cache_dir=str(tmp_path / "cache"))
    (store,) = open_stores(cfg.train, cfg, tok, 0)
    pairs = prompts_and_answers(StoreRows([store], np.arange(2), np.arange(3), packed=False), 5)
    assert [tok.decode(answer, skip_special_tokens=True).strip() for _, answer in pairs] == ["4", "Rome"]
    prompt = tok.decode(pairs[1][0])
    assert "and of Italy?" in prompt and "Paris" in prompt and "Rome" not in prompt
    (first,) = prompts_and_answers(StoreRows([store], np.arange(2), np.arange(3), packed=False), 1)
    assert np.array_equal(first[0], pairs[0][0]) and np.array_equal(first[1], pairs[0][1])
