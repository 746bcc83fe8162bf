"""`sbatch slurm/qlora.sh` on a real two-node Slurm cluster started here: training across nodes, requeue after a
signal with automatic resume, and bounded requeues after real failures.

The cluster is Debian's Slurm (installed when missing) with slurmctld and two slurmd on this host
(tests/slurm_cluster.py). If Slurm cannot start, every test here is skipped with the reason."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, demo_rows, tiny_overrides, write_jsonl
from helpers import adapter, assert_same_adapter, history
from slurm_cluster import SlurmCluster, SlurmUnavailable, sbatch_wait_cmd

# 2 nodes x 1 process on CPU: long enough to be interrupted between checkpoints.
QLORA = {"method.name": "qlora", "training.max_steps": 16, "checkpoint.every_steps": 2, "logging.console": True}
# The test cluster has no GPUs and one CPU per node; the scripts' headers ask for a GPU node.
SBATCH_CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as e:
        print(f"\n*** SLURM TESTS SKIPPED: {e} ***", file=sys.stderr)
        pytest.skip(f"a real Slurm cluster could not start here: {e}")
    yield c
    c.stop()


def job_env(cluster: SlurmCluster, **extra) -> dict[str, str]:
    return {**cluster.env, "FTSCALE_VENV": str(Path(sys.executable).parent.parent), **extra}


def sbatch(cluster, script: str, overrides: list[str], logs: Path, *args: str, env=None, wait=True):
    cmd = sbatch_wait_cmd(["--nodes=2", *SBATCH_CPU, f"--output={logs}/%x-%j.out", *args, script, *overrides])
    if wait:
        return subprocess.run(cmd, cwd=REPO, env=env or job_env(cluster), capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, cwd=REPO, env=env or job_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_log(logs: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(logs.glob("*.out")))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_model_dir, tiny_data, tmp_path_factory):
    out, logs = tmp_path_factory.mktemp("slurm-run"), tmp_path_factory.mktemp("slurm-logs")
    proc = sbatch(cluster, "slurm/qlora.sh", tiny_overrides(tiny_model_dir, tiny_data, out, **QLORA), logs)
    assert proc.returncode == 0, f"{proc.stderr}\n{job_log(logs)[-5000:]}\n{cluster.log_tail()}"
    return out, job_log(logs)


def test_qlora_on_two_nodes_trains_and_writes_an_adapter_that_loads(uninterrupted, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, log = uninterrupted
    assert "2 node(s) x 1 process(es)" in log and "backend MULTI_CPU: 2 processes" in log
    assert log.count("training finished") == 1 and "requeueing" not in log  # a finished run is not requeued
    assert json.loads((out / "summary.json").read_text())["steps"] == QLORA["training.max_steps"]
    assert json.loads((out / "adapter/adapter_config.json").read_text())["peft_type"] == "LORA"
    weights = adapter(out)
    assert weights and all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 9]])
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert not torch.allclose(base(ids).logits, tuned(ids).logits)


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_two_nodes_with_a_sharded_backend(backend, cluster, tiny_model_dir, tiny_data, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    settings = {**QLORA, "training.max_steps": 3, "distributed.zero3_persistence_threshold": 0}
    env = job_env(cluster, FTSCALE_ACCELERATE_CONFIG=f"configs/accelerate/{backend}.yaml")
    proc = sbatch(cluster, "slurm/qlora.sh", tiny_overrides(tiny_model_dir, tiny_data, out, **settings), logs, env=env)
    log = job_log(logs)
    assert proc.returncode == 0, log[-5000:]
    assert "2 processes" in log and "training finished" in log
    local, full = (int(v) for v in re.search(r"frozen base: (\d+) of (\d+) bytes held by rank 0", log).groups())
    assert local <= full // 2 + 4096, (local, full)  # the 4-bit base is sharded across the two nodes
    assert adapter(out)


def test_a_signalled_job_is_requeued_resumes_and_ends_with_the_uninterrupted_adapter(
    cluster, uninterrupted, tiny_model_dir, tiny_data, tmp_path
):
    reference, _ = uninterrupted
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    settings = {**QLORA, "logging.wandb.mode": "offline"}
    proc = sbatch(cluster, "slurm/qlora.sh", tiny_overrides(tiny_model_dir, tiny_data, out, **settings), logs, wait=False)
    end = time.monotonic() + 300
    while not (out / "checkpoints/step-00000004").exists():
        assert proc.poll() is None and time.monotonic() < end, f"no checkpoint appeared: {job_log(logs)[-5000:]}"
        time.sleep(0.05)
    job_id = next(logs.glob("*.out")).stem.rsplit("-", 1)[1]
    # What Slurm does at --signal=B:USR1@N before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster.env, check=True)
    stdout, stderr = proc.communicate(timeout=600)
    log = job_log(logs)
    assert proc.returncode == 0, f"{stderr}\n{log[-6000:]}"
    assert "received USR1: forwarding to the training processes" in log
    assert "preempted after a checkpoint" in log and "requeueing" in log
    assert f"job {job_id} restart 1]" in log and "resumed from" in log and log.count("training finished") == 1
    assert history(out) == history(reference)
    assert_same_adapter(adapter(out), adapter(reference))
    # One W&B run across the requeue: both attempts wrote under the same run id.
    run_id = (out / "wandb-run-id").read_text()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)


def test_a_failing_job_is_requeued_a_bounded_number_of_times(cluster, tiny_model_dir, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    bad = write_jsonl(tmp_path / "bad.jsonl", [*demo_rows(1), "{not json"])
    data = {"train": bad, "eval": bad}
    overrides = tiny_overrides(tiny_model_dir, data, out, **{"data.on_error": "raise"})
    proc = sbatch(cluster, "slurm/train.sh", overrides, logs, "--nodes=1", env=job_env(cluster, FTSCALE_MAX_FAILURES="1"))
    log = job_log(logs)
    assert proc.returncode != 0, log[-4000:]
    assert "failure 1 of 1 allowed" in log and "restart 1]" in log
    assert "failure requeue(s) are used up: not requeueing" in log and "restart 2]" not in log
    assert f"{bad}:2" in log  # the data error itself, with its file and line, reached the job log

    # A config typo ends the job before anything is launched, and is never requeued.
    logs = tmp_path / "typo-logs"
    logs.mkdir()
    proc = sbatch(cluster, "slurm/train.sh", [*overrides, "training.max_stepz=3"], logs, "--nodes=1")
    log = job_log(logs)
    assert proc.returncode == 2 and "training.max_stepz" in log and "max_steps" in log and "requeue" not in log, log


def test_train_sh_runs_every_ftscale_command_inside_an_apptainer_image(cluster, tiny_model_dir, tiny_data, tmp_path):
    """FTSCALE_CONTAINER=*.sif: the config lookups and every node's launcher run through `apptainer exec --nv` with
    the checkout mounted at its own path. No container runtime can run here, so `apptainer` is a stand-in that
    records its arguments, then runs the command on the host with the image's PATH (the venv the image would hold)."""
    out, logs, bin_dir = tmp_path / "run", tmp_path / "logs", tmp_path / "bin"
    logs.mkdir()
    bin_dir.mkdir()
    calls = tmp_path / "apptainer-calls"
    venv_bin = Path(sys.executable).parent
    stand_in = bin_dir / "apptainer"
    stand_in.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {calls}\n'
        '[ "$1" = exec ] || exit 64; shift\n'
        "pwd_dir=.\n"
        "while [ $# -gt 0 ]; do case $1 in --nv) shift ;; --bind) shift 2 ;; --pwd) pwd_dir=$2; shift 2 ;; *) break ;; esac; done\n"
        "shift  # the image\n"
        f'cd "$pwd_dir" && PATH={venv_bin}:$PATH exec "$@"\n'
    )
    stand_in.chmod(0o755)
    # The model, the data and the outputs live outside the checkout: they are mounted too.
    mounts = ",".join(f"{p}:{p}" for p in (tmp_path, tiny_model_dir, tiny_data["train"].parent))
    env = job_env(cluster, FTSCALE_CONTAINER=str(tmp_path / "ftscale.sif"), PATH=f"{bin_dir}:{cluster.env['PATH']}")
    del env["FTSCALE_VENV"]  # the container, not a virtual environment
    overrides = tiny_overrides(tiny_model_dir, tiny_data, out, **{"training.max_steps": 2})
    # Checkpoints outside every mount would stay inside the container, with the requeue marker: refused up front.
    refused = sbatch(cluster, "slurm/train.sh", overrides, logs, "--nodes=1", env=env)
    assert refused.returncode == 2 and "outside the container's mounts" in job_log(logs), job_log(logs)[-3000:]
    for f in logs.iterdir():
        f.unlink()
    env["FTSCALE_CONTAINER_MOUNTS"] = mounts
    proc = sbatch(cluster, "slurm/train.sh", overrides, logs, "--nodes=1", env=env)
    log = job_log(logs)
    assert proc.returncode == 0, f"{proc.stderr}\n{log[-4000:]}"
    assert f"container {tmp_path / 'ftscale.sif'}" in log and "training finished" in log
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    lines = calls.read_text().splitlines()
    prefix = f"exec --nv --bind {REPO}:{REPO},{mounts} --pwd {REPO} {tmp_path / 'ftscale.sif'} "
    lines = lines[2:]  # the refused job's two config lookups
    assert all(line.startswith(prefix) for line in lines), lines
    assert [line.removeprefix(prefix).split()[:3] for line in lines] == [
        ["ftscale", "config", "get"],
        ["ftscale", "config", "get"],
        ["bash", f"{REPO}/slurm/launch_node.sh", f"model.path={tiny_model_dir}"],
    ]
