"""Checkpoints: atomic, adapter-only, exactly resumable after SIGUSR1/SIGTERM and kill -9, reshardable, exportable."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftscale.checkpoint import PREEMPTED, REQUEUE_EXIT_CODE, CheckpointError, complete_checkpoints, export_adapter, verify
from ftscale.checkpoint.layout import write_manifest
from ftscale.config import load_config
from ftscale.recipes.sft import SFTRecipe, recipe_main

from conftest import REPO, build_tiny_model, build_tokenizer, demo_rows, tiny_overrides, write_jsonl
from helpers import METHOD_SETTINGS, adapter, assert_same_adapter, history, launch_cmd, run, train_cmd

# LoRA dropout > 0: a resume that did not restore the RNG would draw other dropout masks and diverge. The host
# memory reuse that the tests' in-process runs leave off (conftest.tiny_overrides) is on in these processes.
SLOW_ENOUGH = {
    "training.max_steps": 40,
    "training.micro_batch_size": 4,
    "checkpoint.every_steps": 3,
    "logging.console": True,
    "method.lora.dropout": 0.1,
    "training.reuse_host_memory": True,
}


def wait_for(path: Path, proc: subprocess.Popen, timeout=300) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path} appeared: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_data):
    """An uninterrupted run that every interrupted run must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference")
    proc = run(train_cmd(tiny_model_dir, tiny_data, out, **SLOW_ENOUGH))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training.reuse_host_memory: " in proc.stderr  # what it did depends on this environment's allocator
    assert "training.fast_cpu_dropout: 14 dropout modules draw their masks in bulk" in proc.stderr  # 7 LoRA layers x 2
    return out


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_exits_for_requeue_and_resumes_bit_identical(sig, reference, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(tiny_model_dir, tiny_data, out, **SLOW_ENOUGH), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(out / "checkpoints/step-00000003", proc)
    proc.send_signal(sig)
    if sig == signal.SIGTERM:
        time.sleep(0.005)
        proc.send_signal(sig)  # a second signal, likely during the save, must not corrupt anything
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-3000:]
    marker = json.loads((out / "checkpoints" / PREEMPTED).read_text())
    assert marker["signal"] == sig.name and 3 <= marker["step"] < 40
    assert (out / "checkpoints/latest").read_text() == f"step-{marker['step']:08d}"
    verify(Path(marker["checkpoint"]), checksums=True)
    assert f"{sig.name} received: stopped after step {marker['step']}" in stderr

    resumed = run(train_cmd(tiny_model_dir, tiny_data, out, **SLOW_ENOUGH))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {marker['checkpoint']} (step {marker['step']}" in resumed.stderr
    assert not (out / "checkpoints" / PREEMPTED).exists()
    assert history(out) == history(reference)
    assert_same_adapter(adapter(out), adapter(reference))


# `ftscale train` in a process that imports everything first, then waits for a line on stdin before it starts: the
# next trial's process warms up (about 8 s of imports) while the current one trains, and starts after the kill.
WARM_TRAIN = (
    "import sys\nimport ftscale.recipes.sft\nfrom ftscale.cli import main\n"
    "if sys.stdin.readline() == 'go\\n':\n    sys.exit(main(['train', *sys.argv[1:]]))"
)


class Child:
    """A training process whose stderr is read line by line as it runs, so a test can act on what it logs."""

    def __init__(self, overrides: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WARM_TRAIN, *overrides],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def start(self) -> Child:
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        return self

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 300) -> int:
        """Index of the first line matching `pattern` at or after line `after`."""
        end, i = time.monotonic() + timeout, after
        while True:
            while i < len(self.lines):
                if re.search(pattern, self.lines[i]):
                    return i
                i += 1
            assert self.proc.poll() is None, f"training ended before logging {pattern!r}: {''.join(self.lines)[-2000:]}"
            assert time.monotonic() < end, f"{pattern!r} never logged"
            time.sleep(0.001)

    def kill(self) -> str:
        self.proc.kill()
        self.proc.wait()
        self.reader.join()
        return "".join(self.lines)


# What the child was doing when it died: the last of these lines it logged (checkpoint phases at logging.level=debug).
# "during the rename" spans the rename, the `latest` pointer and retention, up to "checkpoint ... written".
PHASES = [
    ("during the rename", r"renaming into place"),
    ("inside a save", r"checkpoint step \d+: writing shards"),
    ("during resume", r"resuming from"),
    ("between steps", r"resumed from|checkpoint \S+ written|step \d+/\d+"),
]


def phase_at_kill(log: str) -> str:
    for line in reversed(log.splitlines()):
        for phase, pattern in PHASES:
            if re.search(pattern, line):
                return phase
    return "start-up"


def test_kill_9_at_random_moments_always_resumes_from_newest_complete(reference, tiny_model_dir, tiny_data, tmp_path):
    """12 runs killed with SIGKILL, aimed in turn inside a save, at its rename, during resume and between steps (each
    after a random delay). Every run must resume from the newest complete checkpoint, and the run that finally
    completes must equal the uninterrupted one bit for bit."""
    out, rng = tmp_path / "run", random.Random(7)
    root = out / "checkpoints"
    settings = {**SLOW_ENOUGH, "checkpoint.every_steps": 1, "checkpoint.keep_last": 2, "logging.level": "debug"}
    aims = ["inside a save", "during the rename", "during resume", "between steps"]
    landed = []
    started = [Child(tiny_overrides(tiny_model_dir, tiny_data, out, **settings))]
    try:
        for trial in range(12):
            newest_before = max((c.step for c in complete_checkpoints(root, checksums=True)), default=0)
            aim = aims[trial % len(aims)]
            if aim == "during resume" and not newest_before:
                aim = "inside a save"
            child = started[-1].start()
            started.append(Child(tiny_overrides(tiny_model_dir, tiny_data, out, **settings)))
            if aim == "during resume":
                child.wait_for(r"resuming from")
                time.sleep(rng.uniform(0, 0.01))  # a tiny model's resume takes a few milliseconds
            else:
                target = min(newest_before + rng.randint(1, 3), 39)
                at = child.wait_for(rf"checkpoint step {target}: writing shards")
                if aim == "inside a save":
                    time.sleep(rng.uniform(0, 0.01))
                elif aim == "during the rename":
                    child.wait_for(r"renaming into place", after=at)
                else:
                    child.wait_for(r"checkpoint \S+ written", after=at)
                    time.sleep(rng.uniform(0, 0.1))
            log = child.kill()
            landed.append(phase_at_kill(log))
            if newest_before:
                assert f"resuming from {root / f'step-{newest_before:08d}'}" in log, (
                    f"trial {trial}: did not resume from step {newest_before}"
                )
    finally:  # a failed assertion must not leave a training process behind
        for c in started:
            c.proc.kill()
            c.proc.wait()
    final = run(train_cmd(tiny_model_dir, tiny_data, out, **settings))
    assert final.returncode == 0, final.stderr[-3000:]
    counts = {phase: landed.count(phase) for phase in set(landed)}
    print("kills landed:", counts)
    assert counts.get("inside a save", 0) >= 2 and counts.get("during resume", 0) >= 1 and counts.get("between steps", 0) >= 2, counts
    assert history(out) == history(reference)
    assert_same_adapter(adapter(out), adapter(reference))
    resumed_from = int(re.search(r"\(step (\d+),", final.stderr).group(1))
    kept = sorted(p.name for p in root.iterdir())
    # keep_last=2 plus the one resumed from; no partial save, half-deleted or set-aside folder is left behind.
    assert kept == sorted({f"step-{s:08d}" for s in (39, 40, resumed_from)} | {"latest"})


def test_partial_corrupt_and_unfinished_checkpoints_are_never_loaded(reference, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)
    steps = [c.step for c in complete_checkpoints(root, checksums=True)]
    assert steps == [36, 39, 40]
    # A crash mid-save leaves a .partial folder; a crash before the manifest leaves a folder without one.
    shutil.copytree(root / "step-00000040", root / ".step-00000041.partial")
    shutil.copytree(root / "step-00000040", root / "step-00000042")
    (root / "step-00000042/manifest.json").unlink()
    # A flipped byte in the newest complete checkpoint.
    shard = root / "step-00000040/adapter/shard-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert [c.step for c in complete_checkpoints(root, checksums=True)] == [36, 39]
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify(root / "step-00000040", checksums=True)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="missing or has the wrong size"):
        verify(root / "step-00000040", checksums=False)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        verify(root / "step-00000042", checksums=False)


def test_checkpoint_holds_only_adapter_and_optimizer_state(reference):
    ckpt = reference / "checkpoints/step-00000040"
    params = load_file(str(ckpt / "adapter/shard-00000-of-00001.safetensors"))
    optim = load_file(str(ckpt / "optimizer/shard-00000-of-00001.safetensors"))
    assert params and all(".lora_A." in k or ".lora_B." in k for k in params)
    assert set(optim) == {f"{k}::{s}" for k in params for s in ("exp_avg", "exp_avg_sq", "step")}
    assert not any("embed_tokens" in k or "q_proj.base_layer" in k for k in [*params, *optim])
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 40


def test_wall_clock_saves_and_data_position(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    recipe = SFTRecipe(
        load_config(
            None,
            tiny_overrides(
                tiny_model_dir, tiny_data, out, **{"training.max_steps": 8, "checkpoint.every_minutes": 1e-6, "checkpoint.keep_last": 100}
            ),
        )
    )
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    steps = [c.step for c in complete_checkpoints(out / "checkpoints", checksums=True)]
    assert steps == list(range(1, 9))  # every step is past the (tiny) interval
    state = json.loads((out / "checkpoints/step-00000005/trainer_state.json").read_text())
    rows, per_step = state["num_train_rows"], state["rows_per_step"]
    steps_per_epoch = rows // per_step
    assert (state["epoch"], state["sample_offset"]) == (5 // steps_per_epoch, (5 % steps_per_epoch) * per_step)


def _resume_with(model_dir, data, out, **changes):
    return run([sys.executable, "-m", "ftscale.cli", "train", *tiny_overrides(model_dir, data, out, **{**SLOW_ENOUGH, **changes})])


def test_checkpoint_of_another_config_is_refused_with_the_difference(reference, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    (out / "checkpoints/step-00000040").rename(out / "checkpoints/step-00000041")  # looks unfinished to max_steps
    proc = _resume_with(tiny_model_dir, tiny_data, out, **{"method.lora.r": 4, "training.max_steps": 50})
    assert proc.returncode == 2
    assert "was written by a different run" in proc.stderr
    assert "method.lora.r: checkpoint has 8, this run has 4" in proc.stderr
    proc = _resume_with(tiny_model_dir, tiny_data, out, **{"training.micro_batch_size": 2, "training.max_steps": 50})
    assert proc.returncode == 2 and "written with 4 rows per optimizer step" in proc.stderr


def test_resume_from_a_path_and_retention_spares_the_resumed_checkpoint(reference, tiny_model_dir, tiny_data, tmp_path):
    out, root = tmp_path / "run", tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)  # a copy: the module's reference run stays as it is
    start = root / "step-00000036"
    proc = run(
        train_cmd(
            tiny_model_dir,
            tiny_data,
            out,
            **{
                **SLOW_ENOUGH,
                "checkpoint.resume": str(start),
                "checkpoint.dir": str(root),
                "checkpoint.keep_last": 1,
                "checkpoint.every_steps": 1,
            },
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000036", "step-00000040"]  # keep_last=1, plus the one resumed from
    # The old steps 39 and 40 lay past the resume point: set aside whole, not counted by retention against the new ones.
    (aside,) = (root / "superseded").iterdir()
    assert step_names(aside) == ["step-00000039", "step-00000040"]
    assert history(out) == history(reference)


def step_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def test_a_fresh_run_sets_another_runs_checkpoints_aside_instead_of_mixing(reference, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)  # an older run's steps 36, 39 and 40
    old_id = verify(root / "step-00000040", checksums=True).run_id
    fresh = run(
        train_cmd(
            tiny_model_dir,
            tiny_data,
            out,
            **{**SLOW_ENOUGH, "checkpoint.resume": "none", "training.max_steps": 6, "checkpoint.every_steps": 1, "checkpoint.keep_last": 2},
        )
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert step_names(root) == ["step-00000005", "step-00000006"]  # its own newest two, not deleted for steps 36-40
    assert verify(root / "step-00000006", checksums=True).run_id not in (None, old_id)
    (aside,) = (root / "superseded").iterdir()
    assert step_names(aside) == ["step-00000036", "step-00000039", "step-00000040"]
    assert all(verify(p, checksums=True).run_id == old_id for p in aside.glob("step-*"))  # kept whole
    assert f"3 checkpoint(s) of another run, or past the one resumed from, in {root} moved to {aside}" in fresh.stderr


def test_a_run_that_found_only_broken_checkpoints_keeps_its_own_and_resumes_from_them(reference, tiny_model_dir, tiny_data, tmp_path):
    """Auto-resume finds only corrupt checkpoints of an earlier run (higher step numbers), starts fresh, is
    preempted, and must resume from its own checkpoint rather than restart from zero."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)
    for shard in root.glob("step-*/adapter/shard-*.safetensors"):
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    settings = {**SLOW_ENOUGH, "checkpoint.every_steps": 1, "checkpoint.keep_last": 2}
    proc = subprocess.Popen(
        train_cmd(tiny_model_dir, tiny_data, out, **settings), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(root / "step-00000004", proc)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-2000:]
    stopped = json.loads((root / PREEMPTED).read_text())["step"]
    assert step_names(root)[-1] == f"step-{stopped:08d}"
    resumed = run(train_cmd(tiny_model_dir, tiny_data, out, **settings))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {root / f'step-{stopped:08d}'} (step {stopped}," in resumed.stderr
    assert history(out) == history(reference)
    assert_same_adapter(adapter(out), adapter(reference))


def test_a_checkpoint_from_before_run_ids_resumes_as_its_own_run(tiny_model_dir, tiny_data, tmp_path):
    """Checkpoints written before runs had an identity (no run_id) still resume; the run keeps the W&B id that
    was kept beside them, and its new checkpoints carry it."""
    out = tmp_path / "run"
    settings = {"training.max_steps": 2, "checkpoint.every_steps": 1, "checkpoint.keep_last": 1}
    recipe_main(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, out, **settings)))
    old = out / "checkpoints/step-00000002"
    state = json.loads((old / "trainer_state.json").read_text())
    del state["run_id"]
    (old / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((old / "manifest.json").read_text())
    write_manifest(old, 2, {k: v for k, v in manifest.items() if k in ("world_size", "method")})
    (out / "wandb-run-id").write_text("legacy01")
    summary = recipe_main(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, out, **{**settings, "training.max_steps": 3})))
    assert summary["steps"] == 3
    assert verify(out / "checkpoints/step-00000003", checksums=True).run_id == "legacy01"
    assert step_names(out / "checkpoints") == ["step-00000002", "step-00000003"]  # the one resumed from is kept
    assert not (out / "checkpoints/superseded").exists()  # a legacy checkpoint it resumed from is its own


LEGACY_FIXTURE = REPO / "tests/fixtures/checkpoint-before-redesign"


def test_a_checkpoint_written_before_the_redesign_resumes_exactly(tmp_path):
    """A checkpoint written by an older ftscale (see the fixture's README) resumes, and the run ends with the very
    adapter that older version's uninterrupted run ended with: the on-disk format and the data order are unchanged."""
    tokenizer = build_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data/train.jsonl", demo_rows(48))
    write_jsonl(tmp_path / "data/eval.jsonl", demo_rows(8, "eval"))
    shutil.copytree(LEGACY_FIXTURE / "step-00000003", tmp_path / "out/checkpoints/step-00000003")
    # The overrides the fixture was written with (its README), with paths relative to the run's folder.
    data = {"train": Path("data/train.jsonl"), "eval": Path("data/eval.jsonl")}
    overrides = tiny_overrides(
        Path("tiny-llama"),
        data,
        Path("out"),
        # The fixture's data order came from in-order greedy packing, which data.packer=greedy keeps; its loss was
        # computed unchunked (chunks sum in another order: the same loss, not the same bits); its dropout masks
        # were torch's and its LoRA layers ran peft's forward (the fused one adds in another order).
        **{"checkpoint.every_steps": 3, "method.lora.dropout": 0.1, "checkpoint.keep_last": 5, "data.packer": "greedy"},
        **{"training.loss_chunk_size": "null", "training.fast_cpu_dropout": False, "training.fused_cpu_lora": False},
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/sft.py"), *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from out/checkpoints/step-00000003 (step 3" in proc.stderr
    assert_same_adapter(adapter(tmp_path / "out"), load_file(str(LEGACY_FIXTURE / "final-adapter.safetensors")))
    # The checkpoints this version writes have the old files, and the old keys in the old order and types.
    old, new = LEGACY_FIXTURE / "step-00000003", tmp_path / "out/checkpoints/step-00000006"
    assert sorted(p.relative_to(new) for p in new.rglob("*")) == sorted(p.relative_to(old) for p in old.rglob("*"))
    for name in ("trainer_state.json", "manifest.json", "scheduler.json", "optimizer/param_groups.json"):
        was, now = json.loads((old / name).read_text()), json.loads((new / name).read_text())
        assert list(now) == list(was) if isinstance(was, dict) else len(now) == len(was), name
    was, now = json.loads((old / "trainer_state.json").read_text()), json.loads((new / "trainer_state.json").read_text())
    assert {k: type(v) for k, v in now.items()} == {k: type(v) for k, v in was.items()}


def test_an_interrupted_swap_is_undone_before_the_resume_decision_and_max_steps_below_it_is_refused(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    recipe_main(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, out, **{"training.max_steps": 2})))
    run_id = verify(root / "step-00000002", checksums=True).run_id
    os.rename(root / "step-00000002", root / ".step-00000002.previous")  # a crash between the two renames of a swap
    summary = recipe_main(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, out, **{"training.max_steps": 3})))
    assert [h["step"] for h in summary["history"]] == [0, 1, 2, 3]
    assert verify(root / "step-00000003", checksums=True).run_id == run_id  # resumed, not started afresh
    assert not (root / "superseded").exists()
    from ftscale.config import ConfigError

    with pytest.raises(ConfigError, match="is at step 3, past this run's 2 steps: raise training.max_steps"):
        recipe_main(load_config(None, tiny_overrides(tiny_model_dir, tiny_data, out, **{"training.max_steps": 2})))


def test_a_finished_run_started_again_rewrites_nothing(reference, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "checkpoints/step-00000040/manifest.json").stat().st_mtime_ns
    again = run(train_cmd(tiny_model_dir, tiny_data, out, **SLOW_ENOUGH))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(step 40," in again.stderr and (out / "checkpoints/step-00000040/manifest.json").stat().st_mtime_ns == before
    assert_same_adapter(adapter(out), adapter(reference))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "bottleneck", "qlora"])
def test_export_adapter_equals_the_adapter_saved_by_training(method, tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    recipe_main(
        load_config(
            None,
            tiny_overrides(tiny_model_dir, tiny_data, out, **{"method.name": method, "training.max_steps": 2, **METHOD_SETTINGS[method]}),
        )
    )
    proc = run([sys.executable, "-m", "ftscale.cli", "export-adapter", str(out / "checkpoints/step-00000002"), str(tmp_path / "exported")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["method"] == method
    assert_same_adapter(load_file(str(tmp_path / "exported/adapter_model.safetensors")), adapter(out))
    config = "bottleneck_config.json" if method == "bottleneck" else "adapter_config.json"
    assert json.loads((tmp_path / "exported" / config).read_text()) == json.loads((out / "adapter" / config).read_text())


BACKENDS = {"1": (None, 1), "ddp": ("ddp", 2), "fsdp2": ("fsdp2", 2), "zero2": ("zero2", 2), "zero3": ("zero3", 2)}


RESUME_SETTINGS = {"training.max_steps": 8, "checkpoint.every_steps": 4}


def resume_cmd(backend: str, model_dir, data, out) -> list[str]:
    """8 steps of 4 rows, checkpoints at 4 and 8, as 1 process x 4 rows or 2 processes x 2 rows under `backend`."""
    config, procs = BACKENDS[backend]
    settings = {**RESUME_SETTINGS, "training.micro_batch_size": 4 // procs}
    return launch_cmd(config, model_dir, data, out, **settings) if config else train_cmd(model_dir, data, out, **settings)


@pytest.fixture(scope="module")
def uninterrupted_by_backend(tmp_path_factory, tiny_model_dir, tiny_data):
    """The uninterrupted run of each backend, run once for every case that starts from it (it is only read)."""
    runs: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"whole-{backend}")
            proc = run(resume_cmd(backend, tiny_model_dir, tiny_data, out))
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[backend] = out
        return runs[backend]

    return get


@pytest.mark.parametrize(
    "first, second",
    # A cycle: each backend writes one checkpoint and resumes another's, one to many (1 -> ddp), many to one
    # (zero2 -> 1) and sharded to sharded of another kind (fsdp2 -> zero3), within the suite's 20 minutes.
    [("1", "ddp"), ("ddp", "fsdp2"), ("fsdp2", "zero3"), ("zero3", "zero2"), ("zero2", "1")],
    ids=lambda v: v,
)
def test_resume_with_another_number_of_processes_or_backend(first, second, uninterrupted_by_backend, tiny_model_dir, tiny_data, tmp_path):
    """Same global batch (4 rows per step), split as 1 process x 4 rows or 2 processes x 2 rows, under one process,
    DDP, FSDP2 or DeepSpeed ZeRO-2/3: a checkpoint written by one resumes under another. 1 -> ddp is also the check
    that 2 processes x 2 rows follow the 1 process x 4 rows loss curve and end at its adapter."""
    whole = uninterrupted_by_backend(first)
    shutil.copytree(whole / "checkpoints/step-00000004", tmp_path / "split/checkpoints/step-00000004")
    resumed = run(resume_cmd(second, tiny_model_dir, tiny_data, tmp_path / "split"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"written by {BACKENDS[first][1]} processes" in resumed.stderr
    written = verify(whole / "checkpoints/step-00000008", checksums=True).manifest["world_size"]
    assert written == BACKENDS[first][1]
    # Gradients are reduced in another order across processes: equal up to float rounding.
    torch.testing.assert_close(torch.tensor(history(tmp_path / "split")), torch.tensor(history(whole)), rtol=1e-5, atol=1e-6)
    assert_same_adapter(adapter(tmp_path / "split"), adapter(whole), exact=False)
    if BACKENDS[first][1] == 2:  # a checkpoint written by 2 ranks exports to one adapter
        ex = export_adapter(whole / "checkpoints/step-00000008", tmp_path / "exported")
        assert ex["written_by_ranks"] == 2
        assert_same_adapter(load_file(str(tmp_path / "exported/adapter_model.safetensors")), adapter(whole))
