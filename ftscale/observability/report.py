"""`ftscale report RUN_DIR [RUN_DIR...]`: a PNG of the training curves of one or several runs (overlaid for
comparison) and a Markdown summary, both from the runs' metrics.jsonl files: no W&B needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftscale.errors import FtscaleError
from ftscale.observability.metrics_file import METRICS_FILE, read_metrics

PANELS = (
    ("loss", ("train/loss", "eval/loss")),
    ("learning rate", ("train/lr",)),
    ("real tokens/s (all devices)", ("perf/tokens_per_s",)),
    ("MFU (%)", ("perf/mfu",)),
    ("memory (GB)", ("mem/host_rss_gb", "mem/device_max_allocated_gb")),
)
TIME_PARTS = ("training", "waiting for data", "evaluation", "checkpoints", "logging")


class ReportError(FtscaleError, ValueError):
    """A run folder without metrics to report."""


@dataclass
class RunMetrics:
    name: str
    records: list[dict]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key] * (100 if key == "perf/mfu" else 1)) for r in self.records if r.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    def time_split(self) -> dict[str, float]:
        """Seconds spent in each part. Waiting for data is inside the training steps' time and taken out of it."""

        def total(key):
            return sum(r.get(key) or 0.0 for r in self.records)

        waited = total("time/data_wait_s")
        return {
            "training": total("time/train_s") - waited,
            "waiting for data": waited,
            "evaluation": total("time/eval_s"),
            "checkpoints": total("time/checkpoint_s"),
            "logging": total("time/logging_s"),
        }

    def summary(self) -> dict[str, float | int | None]:
        def last(key):
            values = self.series(key)[1]
            return values[-1] if values else None

        def time_weighted(key):
            pairs = [(r[key], r["time/train_s"]) for r in self.records if r.get(key) is not None and r.get("time/train_s")]
            total = sum(t for _, t in pairs)
            return sum(v * t for v, t in pairs) / total if total else None

        evals = self.series("eval/loss")[1]
        return {
            "steps": max(r["step"] for r in self.records),
            "final train loss": last("train/loss"),
            "eval loss before": evals[0] if evals and self.records[0]["step"] == 0 else None,
            "final eval loss": evals[-1] if evals else None,
            "final exact match": last("eval/exact_match"),
            "tokens/s": time_weighted("perf/tokens_per_s"),
            "MFU (%)": None if (m := time_weighted("perf/mfu")) is None else 100 * m,
            "peak host RSS (GB)": max(self.series("mem/host_rss_gb")[1], default=None),
            "peak device memory (GB)": max(self.series("mem/device_max_allocated_gb")[1], default=None),
        }


def load_run(run_dir: Path, name: str) -> RunMetrics:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{path} not found: give the output folder of a training run (its training.output_dir)")
    records = read_metrics(path)
    if not records:
        raise ReportError(f"{path} holds no metrics yet: the run has not logged a step")
    for record in records:
        for key, value in record.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ReportError(
                    f"{path}: step {record['step']}: {key} is {value!r}, not a number; is this a metrics.jsonl ftscale wrote?"
                )
    return RunMetrics(name, records)


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or its path as given where folder names repeat."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names, strict=True)]


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_summary(runs: list[RunMetrics]) -> str:
    summaries = [r.summary() for r in runs]
    lines = ["# Training report", "", "| run | " + " | ".join(summaries[0]) + " |", "|---" * (len(summaries[0]) + 1) + "|"]
    lines += [f"| {run.name} | " + " | ".join(_cell(v) for v in s.values()) + " |" for run, s in zip(runs, summaries, strict=True)]
    lines += ["", "## Where the time went", "", "| run | " + " | ".join(TIME_PARTS) + " |", "|---" * (len(TIME_PARTS) + 1) + "|"]
    for run in runs:
        split = run.time_split()
        total = sum(split.values()) or 1.0
        lines.append(f"| {run.name} | " + " | ".join(f"{s:.1f} s ({100 * s / total:.0f}%)" for s in split.values()) + " |")
    return "\n".join(lines) + "\n"


def render_report(run_dirs: list[Path], out: Path) -> tuple[Path, Path]:
    """Write out/report.png and out/report.md; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file: give a folder for report.png and report.md")
    runs = [load_run(d, name) for d, name in zip(run_dirs, run_names(run_dirs), strict=True)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
    for ax, (title, keys) in zip(axes.flat, PANELS, strict=False):
        for i, run in enumerate(runs):
            color = f"C{i}"
            for key in keys:
                steps, values = run.series(key)
                if values:
                    style = {"marker": "o", "linestyle": "--"} if key.startswith("eval") or "device" in key else {}
                    ax.plot(steps, values, color=color, label=f"{run.name}: {key}", **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    ax = axes.flat[-1]
    left, splits = [0.0] * len(runs), [run.time_split() for run in runs]
    for j, part in enumerate(TIME_PARTS):
        widths = [split[part] for split in splits]
        ax.barh([run.name for run in runs], widths, left=left, color=f"C{j}", label=part)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_title("where the time went (s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "report.png", out / "report.md"
    fig.savefig(png)
    plt.close(fig)
    md.write_text(markdown_summary(runs))
    return png, md
