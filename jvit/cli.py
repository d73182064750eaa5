"""The ``jvit`` command: ``jvit predict|summary|export ...`` runs ``python -m jvit.<command> ...``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "predict": "classify images (top-k ImageNet names)",
    "summary": "parameters, FLOPs and activation memory of a variant",
    "export": "write a TensorFlow SavedModel",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its module's ``main(argv[1:])``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:8s} {what}" for name, what in COMMANDS.items())
        print(f"usage: jvit COMMAND [ARGS]   (jvit COMMAND --help for its options)\n{usage}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return importlib.import_module(f"jvit.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
