"""The job's one W&B run (rank 0): its identity across resumes, what it records about the run, the adapter
artifact. The API key is read by wandb itself from the environment or ~/.netrc; nothing here copies it."""

from __future__ import annotations

from pathlib import Path

from ftscale.checkpoint.layout import WANDB_RUN_ID
from ftscale.config import FtscaleConfig


def start_run(cfg: FtscaleConfig, run_id: str, info: dict):
    """`run_id` is the checkpoint store's run identity: a resumed run keeps it and so continues its W&B run and
    step axis; a fresh run in the same output folder has a new one and starts a new W&B run."""
    import wandb

    wb = cfg.logging.wandb
    out = Path(wb.dir or cfg.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=wb.project,
        entity=wb.entity,
        name=wb.run_name or Path(cfg.training.output_dir).name,
        group=wb.group,
        tags=wb.tags or None,
        notes=wb.notes,
        dir=str(out),
        mode=wb.mode,
        config={**cfg.model_dump(mode="json"), "run": info},
        id=run_id,
        resume="allow",  # a fresh run has a new id, so only a resumed run continues one
    )
    (Path(cfg.training.output_dir) / WANDB_RUN_ID).write_text(run_id)  # for `wandb sync` and scripts
    return run


def log_adapter(run, folder: Path, run_id: str) -> None:
    import wandb

    artifact = wandb.Artifact(f"adapter-{run_id}", type="model", metadata={"path": str(folder)})
    artifact.add_dir(str(folder))
    run.log_artifact(artifact)
