"""Plain helpers shared by several test modules (fixtures stay in conftest.py): training commands, run outputs, ports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_overrides

# Overrides each method needs on top of tiny_overrides: prompt methods cannot pack rows, and some learn too slowly
# at the default learning rate for a few-step run.
METHOD_SETTINGS = {
    "lora": {},
    "qlora": {},
    "dora": {},
    "ia3": {"training.learning_rate": 3e-2},
    "prompt_tuning": {"data.packing": False, "training.learning_rate": 3e-2},
    "prefix_tuning": {"data.packing": False, "training.learning_rate": 1e-2},
    "p_tuning": {"data.packing": False, "training.learning_rate": 1e-2},
    "bottleneck": {},
}


def train_cmd(model_dir, data, out, **extra) -> list[str]:
    return [sys.executable, str(REPO / "launch/sft.py"), *tiny_overrides(model_dir, data, out, **extra)]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, **kw)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter/adapter_model.safetensors"))


def train_losses(history: list[dict]) -> list[float]:
    """The per-step training losses of a history (evaluation-only entries, such as step 0's, left out)."""
    return [h["train/loss"] for h in history if "train/loss" in h]


def history(out: Path) -> list[float]:
    return train_losses(json.loads((out / "summary.json").read_text())["history"])


def assert_same_adapter(a: dict, b: dict, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(accelerate_config: str, model_dir, data, out, **extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / f"configs/accelerate/{accelerate_config}.yaml"),
        "--main_process_port",
        str(free_port()),
        str(REPO / "launch/sft.py"),
        *tiny_overrides(model_dir, data, out, **extra),
    ]


def ddp_cmd(model_dir, data, out, **extra) -> list[str]:
    return launch_cmd("ddp", model_dir, data, out, **extra)
