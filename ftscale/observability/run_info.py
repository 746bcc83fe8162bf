"""What a W&B run records about where it ran: code version, package versions, devices and processes."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch
from packaging.requirements import Requirement


def git_commit(folder: Path) -> str | None:
    """HEAD of the repository holding `folder` (with "+dirty" for uncommitted changes), or None outside one."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    """ftscale's and each of its dependencies' (extras included) installed version; None where one is not installed."""
    try:
        requirements = metadata.requires("ftscale") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        requirements = []
    names = ["ftscale"] + [Requirement(r).name for r in requirements if 'extra == "dev"' not in r]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_info(device: torch.device, world_size: int) -> dict:
    if device.type == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        names = [platform.processor() or platform.machine()]
    return {
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "packages": package_versions(),
        "python": platform.python_version(),
        "device_type": device.type,
        "device_names": names,
        "devices_per_node": len(names) if device.type == "cuda" else 1,
        "world_size": world_size,
        "host": platform.node(),
    }
