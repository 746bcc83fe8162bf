"""Progress on the console: a bar on a terminal, plain log lines otherwise (a Slurm log)."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("ftscale")
SHOWN = ("train/loss", "eval/loss", "eval/exact_match", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "mem/host_rss_gb")


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ConsoleProgress:
    """The ETA is from this process's own rate (steps done since it started training), so it holds after a
    resume, when the step count does not start at 0."""

    def __init__(self, total: int, start_step: int, interactive: bool | None = None):
        self.total, self.start_step, self.began = total, start_step, time.monotonic()
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = self._redirect = None
        if interactive:  # smoothing=0: tqdm's ETA from the average rate since this process started, as below
            self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0)
            self._redirect = logging_redirect_tqdm()  # log lines print above the bar instead of breaking it
            self._redirect.__enter__()

    def eta_s(self, step: int) -> float | None:
        done = step - self.start_step
        return (time.monotonic() - self.began) / done * (self.total - step) if done > 0 else None

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, step: int, metrics: dict[str, float]) -> None:
        shown = {k: metrics[k] for k in SHOWN if k in metrics}
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
            return
        eta = self.eta_s(step)
        text = "  ".join(f"{k}={v:.4g}" for k, v in shown.items())
        log.info("step %d/%d  %s  eta=%s", step, self.total, text, _duration(eta) if eta is not None else "-")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = None
