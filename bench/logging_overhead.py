"""What metrics cost a training step (issue 13), on the SmolLM2 demo recipe. Prints one JSON line.

    python bench/logging_overhead.py [--steps 8] [--pairs 2]

Two measurements:
- end to end: the demo recipe run alternately (ABBA...) with logging on (console, W&B offline, a line every step) and
  off (no console, W&B disabled, one line at the end); the mean step time (metrics.jsonl's time/train_s over steps)
  of each, and their difference;
- in process: the time of the per-step metric work itself (the step's reduction vector, the window, and
  MetricLogger.log to metrics.jsonl + W&B offline + console), averaged over 200 calls, as a share of a step.
Needs the imported model (`make model`)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ON = ["logging.console=true", "logging.wandb.mode=offline", "training.log_every=1"]
OFF = ["logging.console=false", "logging.wandb.mode=disabled", "training.log_every=1000"]


def run(tmp: Path, name: str, logging: list[str], steps: int) -> float:
    out = tmp / name
    cmd = [sys.executable, "-m", "ftscale.cli", "train", "--config", str(REPO / "configs/smollm2-135m/lora.yaml")]
    cmd += [f"training.output_dir={out}", f"training.max_steps={steps}", "data.eval=[]", "data.max_seq_len=256", *logging]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(r.get("time/train_s", 0) for r in lines) / steps


def per_step_metric_cost(tmp: Path, calls: int = 200) -> float:
    from ftscale.config import load_config
    from ftscale.observability.flops import ModelFlops
    from ftscale.observability.logger import MetricLogger
    from ftscale.observability.step_metrics import LocalStep, MetricsWindow, StepTotals, reduce_step

    (tmp / "cost").mkdir()
    cfg = load_config(None, [f"training.output_dir={tmp}/cost", *ON])
    logger = MetricLogger(cfg, True, calls, 0, "costbench", None, {})
    window = MetricsWindow(ModelFlops(10**8, 10**6, 30, 576), 1e11, 1, 100, 0)
    local = LocalStep(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0), 1024, 0.001, 0.5, 1.0)
    start = time.perf_counter()
    for step in range(1, calls + 1):
        reduced = reduce_step(local, (False, False), 0, 1, torch.device("cpu"), lambda v: v)
        window.add_step(reduced, StepTotals(1000, 400, 4, 100000), 1.0, 1e-4, 0.5)
        logger.log(step, window.record(step))
    cost = (time.perf_counter() - start) / calls
    logger.close()
    return cost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        on, off = [], []
        for i in range(args.pairs):  # ABBA: drift of the machine's speed cancels out
            order = [("on", ON, on), ("off", OFF, off)] if i % 2 == 0 else [("off", OFF, off), ("on", ON, on)]
            for name, logging, times in order:
                times.append(run(tmp, f"{name}{i}", logging, args.steps))
        cost = per_step_metric_cost(tmp)
    step_on, step_off = statistics.mean(on), statistics.mean(off)
    print(
        json.dumps(
            {
                "bench": "logging_overhead",
                "steps_per_run": args.steps,
                "step_s_logging_on": round(step_on, 4),
                "step_s_logging_off": round(step_off, 4),
                "end_to_end_difference_pct": round(100 * (step_on - step_off) / step_off, 2),
                "runs_on": [round(t, 4) for t in on],
                "runs_off": [round(t, 4) for t in off],
                "metric_work_per_step_ms": round(1000 * cost, 3),
                "metric_work_pct_of_step": round(100 * cost / step_off, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
