"""Metrics out of a run: TensorBoard event files and console (clu), ``metrics.jsonl``, progress lines."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping

from clu import metric_writers

log = logging.getLogger("jvit.train")


class Reporter:
    """Writes scalars to TensorBoard (``<workdir>/tensorboard``) and ``<workdir>/metrics.jsonl``
    (one ``{"step": ..., name: value, ...}`` object per line, appended across resumed runs); eval
    results also go to the console through clu's logging writer. Only the primary host writes files.
    """

    def __init__(self, workdir: str, total_steps: int, *, primary: bool):
        self.total_steps, self.primary = total_steps, primary
        self.tensorboard = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")) if primary else None
        self.console = metric_writers.LoggingWriter()
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if primary else None
        self._mark: tuple[float, int] | None = None  # (time, step) at the last progress line

    def scalars(self, step: int, values: Mapping[str, float], *, console: bool = False) -> None:
        values = {k: float(v) for k, v in values.items()}
        if self.primary:
            self.tensorboard.write_scalars(step, values)
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        if console:
            self.console.write_scalars(step, values)

    def start(self, step: int) -> None:
        """Start timing from ``step`` (call after the first, compiling, step)."""
        self._mark = (time.perf_counter(), step)

    def progress(self, step: int, loss: float, lr: float, batch_size: int) -> None:
        """``step 200/2000 (10.0%) loss 1.234 lr 1.0e-03 img/s 512.3 eta 0:03:21`` and the same to files."""
        values = {"train/loss": loss, "train/lr": lr}
        now = time.perf_counter()
        if self._mark is not None and step > self._mark[1]:
            then, prev = self._mark
            per_step = (now - then) / (step - prev)
            values["train/img_per_sec"] = batch_size / per_step
            eta = _hms(per_step * (self.total_steps - step))
            speed = f" img/s {values['train/img_per_sec']:.1f} eta {eta}"
        else:
            speed = ""
        self._mark = (now, step)
        log.info("step %d/%d (%.1f%%) loss %.4f lr %.3e%s", step, self.total_steps, 100.0 * step / self.total_steps,
                 loss, lr, speed)
        self.scalars(step, values)

    def close(self) -> None:
        if self.primary:
            self.tensorboard.close()
            self.jsonl.close()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
