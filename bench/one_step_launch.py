"""The command the memory benches launch: one LoRA/QLoRA step of the recipe on 2 ranks under an accelerate config,
on 8 rows of the demo data, with no held-out data, no final adapter and no console output."""

from __future__ import annotations

import sys
from pathlib import Path


def one_step_command(repo: Path, accelerate_config: Path, recipe_config: Path, tmp: Path, out: Path, *launch_options: str) -> list[str]:
    """`repo`'s launch/sft.py; `launch_options` go to accelerate launch (a port, say). Append the run's own overrides."""
    data = tmp / "train.jsonl"
    data.write_text("".join((repo / "data/demo/train.jsonl").read_text().splitlines(keepends=True)[:8]))
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config),
        "--num_processes",
        "2",
        *launch_options,
        str(repo / "launch/sft.py"),
        "--config",
        str(recipe_config),
        f"data.train=[{{path: {data}}}]",
        "data.eval=[]",
        f"training.output_dir={out}",
        "training.max_steps=1",
        "training.micro_batch_size=1",
        "training.gradient_accumulation_steps=1",
        "checkpoint.save_final_adapter=false",
        "logging.console=false",
    ]
