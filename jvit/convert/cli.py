"""Command line: convert an original PyTorch checkpoint into a jvit (orbax) checkpoint directory.

    python tools/convert_torch.py So-ViT-7.pth.tar --model sovit_7 --output converted/sovit_7

The directory holds the variables and a ``jvit.json`` naming the model; load it back with
``jvit.checkpoint.load_variables(DIR)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jvit.checkpoint import save_variables
from jvit.convert import convert_checkpoint
from jvit.registry import list_models


def build_parser() -> argparse.ArgumentParser:
    """The converter's argument parser."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the original .pth / .pth.tar file")
    p.add_argument("--model", required=True, choices=list_models(), metavar="NAME", help="registered model name")
    p.add_argument("--output", required=True, help="new directory for the converted checkpoint")
    p.add_argument("--num-classes", type=int, default=None, help="default: inferred from the checkpoint's head")
    p.add_argument("--img-size", type=int, default=None, help="default: the variant's official resolution")
    p.add_argument(
        "--weights-key",
        default=None,
        help="wrapper entry to convert instead of the evaluated one (e.g. state_dict for non-EMA weights)",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow arbitrary unpickling (runs code from the file): only for files you trust",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if os.path.exists(args.output):
        print(f"error: {args.output} already exists; choose a new --output directory", file=sys.stderr)
        return 2
    size_mb = os.path.getsize(args.checkpoint) / 2**20 if os.path.isfile(args.checkpoint) else 0.0
    print(f"[1/3] reading {args.checkpoint} ({size_mb:.1f} MiB)", flush=True)
    t0 = time.perf_counter()
    try:
        variables, report = convert_checkpoint(
            args.checkpoint,
            args.model,
            args.num_classes,
            args.img_size,
            weights_key=args.weights_key,
            trust=args.trust_checkpoint,
        )
    except (OSError, ValueError, RuntimeError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[2/3] {report}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    path = save_variables(
        args.output,
        variables,
        {
            "model": args.model,
            "num_classes": report.num_classes,
            "img_size": report.img_size,
            "source": os.path.abspath(args.checkpoint),
            "weights_key": report.weights_key,
            "param_count": report.per_collection.get("params", 0),
        },
    )
    print(f"[3/3] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
