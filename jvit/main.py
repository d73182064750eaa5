"""Train or evaluate a jvit model: ``python -m jvit.main --config configs/<exp>.py --workdir DIR``.

    python -m jvit.main --config configs/default.py --workdir runs/default
    python -m jvit.main --config configs/sot_base.py --workdir runs/sot_base --config.batch_size=256
    python -m jvit.main --config configs/sot_base.py --workdir runs/sot_base --mode=eval

A rerun with the same ``--workdir`` resumes from its latest checkpoint. ``--config.<field>=value``
overrides any field of the config (see ``jvit/train/config.py`` for all of them).
"""

from __future__ import annotations

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jvit.errors import ConfigError
from jvit.train import distributed, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/<exp>.py[:arg])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the resolved config")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (with periodic eval), or eval the workdir's latest checkpoint / config.init_from")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drop the INFO chatter of orbax (several lines per checkpoint), tfds and clu (its progress notes
    repeat the progress line); keep warnings."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "tensorflow_datasets", "jax/_src", "clu"))
        return record.levelno >= pylogging.WARNING or not noisy


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    pylogging.getLogger("absl").addFilter(_QuietLibraries())
    run = loop.train_and_evaluate if _MODE.value == "train" else loop.evaluate_checkpoint
    loop.enable_compilation_cache(_CONFIG.value, _WORKDIR.value)
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, loop.NonFiniteLossError, distributed.DistributedInitError) as e:
        logging.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
