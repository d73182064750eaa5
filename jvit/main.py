"""Train or evaluate a jvit model: ``python -m jvit.main --config configs/<exp>.py --workdir DIR``.

    python -m jvit.main --config configs/default.py --workdir runs/default
    python -m jvit.main --config configs/sot_base.py --workdir runs/sot_base --config.batch_size=256
    python -m jvit.main --config configs/sot_base.py --workdir runs/sot_base --mode=eval

A rerun with the same ``--workdir`` resumes from its latest checkpoint. ``--config.<field>=value``
overrides any field of the config (see ``jvit/train/config.py`` for all of them);
``--config.model.kwargs.<arg>=value`` sets any constructor argument of the model (checked against
the model's fields). Failures an operator can fix (a bad override, a busy or unusable workdir, a
checkpoint that cannot be written, an unreadable dataset file in evaluation, an unloadable
``init_from``) end with one ``error:`` line and exit code 1 (2 for command-line errors).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import logging as pylogging
import re
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

# jvit itself (and with it JAX, TensorFlow and their start-up log lines) is imported only after the
# flags parsed: a misspelt flag is one line, printed at once. Nothing here is imported lazily to dodge a cycle.

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file (configs/<exp>.py[:arg])", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the resolved config")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "train (with periodic eval), or eval the workdir's latest checkpoint / config.init_from",
)
flags.mark_flags_as_required(["config", "workdir"])

_KWARGS_FLAG = re.compile(r"^--config\.model\.kwargs\.([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$")


class _QuietLibraries(pylogging.Filter):
    """Drop the INFO chatter of orbax (several lines per checkpoint), tfds and clu (its progress notes
    repeat the progress line); keep warnings."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "tensorflow_datasets", "jax/_src", "clu"))
        return record.levelno >= pylogging.WARNING or not noisy


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_value(text: str, current: Any) -> Any:
    """A command-line value typed like ``current`` (the field's present value) where possible."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string, e.g. an activation name
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and not isinstance(current, (int, float, str, tuple, list)):
        return value
    if (
        current is not None
        and type(value) is not type(current)
        and not (isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)))
    ):
        raise ValueError(f"expected a {type(current).__name__}, got {text!r}")
    return tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value


def apply_model_kwargs(config: Any, overrides: list[tuple[str, str]]) -> None:
    """Set ``config.model.kwargs[name] = value`` for each ``(name, text)`` override, checking ``name``
    against the constructor fields of the registered variant ``config.model.name`` (its linen
    Module's dataclass fields) and typing the value like the field's current value."""
    import jvit

    module = jvit.create_model(config.model.name)
    fields = {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.init and f.name not in ("parent", "name", "num_classes", "img_size")
    }
    kwargs = config.model.kwargs
    for name, text in overrides:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            raise ValueError(
                f"--config.model.kwargs.{name}: {config.model.name} has no constructor argument {name!r}; "
                f"{hint}its arguments are {', '.join(sorted(fields))}"
            )
        current = kwargs[name] if name in kwargs else fields[name]
        try:
            value = _parse_value(text, current)
        except ValueError as e:
            raise ValueError(f"--config.model.kwargs.{name}={text}: {e}") from None
        with kwargs.unlocked():
            kwargs[name] = value


def _one_line(error: BaseException, argv: list[str]) -> str:
    """ml_collections' error for an unknown override (a repr'd KeyError with its suggestion) as one line."""
    text = str(error)
    while text[:1] in "'\"" and text[-1:] == text[:1]:
        text = ast.literal_eval(text) if text.count("\n") == 0 else text[1:-1]
    text = text.replace("\\n", " ").replace("\n", " ").replace("\\'", "'").strip()
    key = re.match(r"^'?([^' ]+)'?", text)
    flag = next((a for a in argv if key and a.startswith("--config.") and key.group(1) in a.split("=")[0]), None)
    return f"{flag.split('=')[0] if flag else 'a --config override'}: no such config field {text}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with errors as one line (no traceback) and ``--config.model.kwargs.*``
    applied after the config is loaded (a locked config cannot gain new keys through overrides)."""
    rest, kwargs = [], []
    for arg in argv:
        match = _KWARGS_FLAG.match(arg)
        if match is None:
            rest.append(arg)
        elif match.group(2) is None:
            _usage_error(f"{arg}: give a value, e.g. {arg}=0.1")
        else:
            kwargs.append((match.group(1), match.group(2)))
    sys.argv[:] = rest  # config_flags reads the override flags from sys.argv itself
    try:
        remaining = flags.FLAGS(rest)
    except flags.Error as e:
        _usage_error(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
        _usage_error(_one_line(e, rest))
    except (ValueError, TypeError) as e:  # ml_collections: an override's value does not fit the field
        _usage_error(f"bad --config override: {e}")
    if kwargs:
        try:
            apply_model_kwargs(_CONFIG.value, kwargs)
        except (ValueError, KeyError) as e:
            _usage_error(str(e).strip("'\""))
    return remaining


# Exceptions that are an operator's to fix: reported as one line, not a traceback.


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    pylogging.getLogger("absl").addFilter(_QuietLibraries())
    from jvit.convert.torch_io import CheckpointFormatError, UnsafeCheckpointError
    from jvit.errors import ConfigError, CorruptImageError
    from jvit.train import distributed, loop
    from jvit.train.checkpointing import CheckpointWriteError, NoUsableCheckpointError

    # Errors that are an operator's to fix: reported as one line, not a traceback.
    clean = (
        ConfigError,
        loop.NonFiniteLossError,
        CheckpointWriteError,
        NoUsableCheckpointError,
        CorruptImageError,
        UnsafeCheckpointError,
        CheckpointFormatError,
        distributed.DistributedInitError,
    )
    run = loop.train_and_evaluate if _MODE.value == "train" else loop.evaluate_checkpoint
    loop.enable_compilation_cache(_CONFIG.value, _WORKDIR.value)
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, clean):  # grain wraps errors of its worker threads
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
