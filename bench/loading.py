"""Peak memory per rank while loading the base under FSDP2 and ZeRO-3 (issue 3). Prints one JSON line.

    python bench/loading.py

SmolLM2-135M-Instruct (fp32, 538 MB of weights), 2 processes on CPU, one training step, for LoRA and QLoRA.
Under each backend the run happens twice: memory-efficient loading on (rank 0 reads the base, the other rank
receives only its shards) and off (every rank reads the whole base). The figure is each rank's peak RSS
(ru_maxrss), read at exit through a sitecustomize module that only this script installs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from one_step_launch import one_step_command  # noqa: E402  (a bench module beside this one)

PEAK = (
    "import atexit, os, resource, sys\n"
    'atexit.register(lambda: print(f\'PEAK_RSS rank={os.environ.get("RANK")} '
    "kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr))\n"
)
# The switch per backend: a line of its accelerate config.
SWITCH = {
    "fsdp2": ("fsdp_cpu_ram_efficient_loading: true", "fsdp_cpu_ram_efficient_loading: false"),
    "zero3": ("zero3_init_flag: true", "zero3_init_flag: false"),
}


def run(tmp: Path, backend: str, method: str, efficient: bool) -> dict[int, float]:
    on, off = SWITCH[backend]
    text = (REPO / f"configs/accelerate/{backend}.yaml").read_text()
    config = tmp / f"{backend}-{efficient}.yaml"
    config.write_text(text if efficient else text.replace(on, off))
    recipe = REPO / f"configs/smollm2-135m/{method}.yaml"
    cmd = [*one_step_command(REPO, config, recipe, tmp, tmp / f"{backend}-{method}-{efficient}"), "data.max_seq_len=128"]
    env = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{REPO}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return {int(r): round(int(kb) / 1024 / 1024, 3) for r, kb in re.findall(r"PEAK_RSS rank=(\d) kb=(\d+)", proc.stderr)}


def main() -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(PEAK)
        for backend in ("fsdp2", "zero3"):
            for method in ("lora", "qlora"):
                row = {"backend": backend, "method": method}
                for efficient in (True, False):
                    peaks = run(Path(tmp), backend, method, efficient)
                    row["rank0_peak_gb" if efficient else "rank0_peak_gb_every_rank_reads"] = peaks[0]
                    row["rank1_peak_gb" if efficient else "rank1_peak_gb_every_rank_reads"] = peaks[1]
                results.append(row)
    print(json.dumps({"model": "SmolLM2-135M-Instruct fp32", "processes": 2, "results": results}))


if __name__ == "__main__":
    main()
