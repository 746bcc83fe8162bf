"""metrics.jsonl in the output folder: one JSON line per logged step, flushed as it is written, whatever the W&B
mode. It is the run's true history: a resumed run first drops the lines past the step it resumed from (they
belong to work it is about to redo), and a fresh run in an old folder moves the old file aside."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from ftscale.atomic_files import write_text_atomically

log = logging.getLogger("ftscale")
METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash (the last one) is skipped."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class MetricsFile:
    def __init__(self, path: Path, resumed_step: int | None):
        self.path = path
        if resumed_step is not None and path.is_file():
            kept = [r for r in read_metrics(path) if r["step"] <= resumed_step]
            write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resumed_step is None and path.is_file() and path.stat().st_size:
            aside = path.with_name(f"metrics.superseded-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            path.rename(aside)
            log.warning("%s belonged to an earlier run in this folder: moved to %s", path, aside.name)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run, closed by close())

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """NaN and infinity (a diverged loss) are written as null: strict JSON readers (jq) reject them."""
        values = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
