"""Metrics out of a run: TensorBoard event files and console (clu), ``metrics.jsonl``, progress lines."""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from clu import metric_writers, periodic_actions

log = logging.getLogger("jvit.train")


class _Rate:
    """Receives clu ``ReportProgress``'s ``steps_per_sec`` (its only use of a writer), so the progress
    line can show img/s and the ETA."""

    steps_per_sec: float | None = None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if "steps_per_sec" in scalars:
            self.steps_per_sec = float(scalars["steps_per_sec"])


class Reporter:
    """Writes scalars to TensorBoard (``<workdir>/tensorboard``) and ``<workdir>/metrics.jsonl`` (one
    ``{"step": ..., name: value, ...}`` object per line, appended across resumed runs); eval results
    also go to the console through clu's logging writer. Only the primary host writes files.

    Progress (step rate, ETA) is measured by clu's ``periodic_actions.ReportProgress``, fired on the
    logging steps; an optional ``periodic_actions.Profile`` writes a ``jax.profiler`` trace.
    """

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        *,
        primary: bool,
        log_every_steps: int,
        profile_first_step: int = 0,
        profile_num_steps: int = 5,
    ):
        self.total_steps, self.primary = total_steps, primary
        self.tensorboard = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")) if primary else None
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if primary else None
        self.console = metric_writers.LoggingWriter()
        self._rate = _Rate()
        self._progress = periodic_actions.ReportProgress(
            num_train_steps=total_steps, writer=self._rate, every_steps=log_every_steps, every_secs=None
        )
        self._profile = (
            periodic_actions.Profile(
                logdir=os.path.join(workdir, "profile"),
                first_profile=profile_first_step,
                num_profile_steps=profile_num_steps,
            )
            if profile_first_step and primary
            else None
        )

    def scalars(self, step: int, values: Mapping[str, float], *, console: bool = False) -> None:
        """Write ``values`` at ``step`` to the files (and the console)."""
        values = {k: float(v) for k, v in values.items()}
        if self.primary:
            self.tensorboard.write_scalars(step, values)
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        if console:
            self.console.write_scalars(step, values)

    def step(self, step: int) -> None:
        """Tell the progress/profile hooks that ``step`` has been dispatched (call after every step;
        the first call only starts the clock, so compilation is not counted)."""
        self._progress(step)
        if self._profile is not None:
            self._profile(step)

    def timed(self, name: str):
        """Context manager: the time spent in ``name`` (e.g. eval) shows in the progress notes."""
        return self._progress.timed(name)

    def progress(self, step: int, loss: float, lr: float, batch_size: int) -> None:
        """``step 200/2000 (10.0%) loss 1.234 lr 1.0e-03 img/s 512.3 eta 0:03:21`` and the same to files."""
        values = {"train/loss": loss, "train/lr": lr}
        speed = ""
        rate = self._rate.steps_per_sec
        if rate:
            values["train/img_per_sec"] = batch_size * rate
            eta = datetime.timedelta(seconds=round((self.total_steps - step) / rate))
            speed = f" img/s {values['train/img_per_sec']:.1f} eta {eta}"
        log.info(
            "step %d/%d (%.1f%%) loss %.4f lr %.3e%s",
            step,
            self.total_steps,
            100.0 * step / self.total_steps,
            loss,
            lr,
            speed,
        )
        self.scalars(step, values)

    def close(self) -> None:
        """Flush and close the files."""
        if self.primary:
            self.tensorboard.close()
            self.jsonl.close()
