"""Model summary: parameters per module, FLOPs per image, train-mode activation memory per image.

    jvit summary hvt_s_1 [--img-size 224] [--json]
    python -m jvit.summary hvt_s_1

Everything is measured from shapes (no weights are materialised) and XLA's compiled-program
analyses on the current backend: FLOPs are XLA's ``cost_analysis`` of the eval forward at batch 1
(a multiply-add counts 2; the papers' "FLOPs" are multiply-adds, reported here as ``gmacs``: XLA also
counts element-wise ops, softmax and normalisations, so ``gmacs`` runs 1-11 % above the papers' counts
of matmul/conv multiply-adds, e.g. HVT-Ti-1 0.649 vs 0.642, So-ViT-7 1.434 vs 1.295), and the
activation memory per image is the growth of the compiled train-mode forward + backward's temporary
buffers from batch 1 to batch 2 (what each extra image costs when training). The FLOPs of a model with
scanned blocks (``scan_blocks``) are those of its unrolled twin, the same computation: XLA's cost analysis
counts the body of a loop once, not once per iteration.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jvit
from jvit.models import layers
from jvit.utils import count_params


def summarize(model: nn.Module, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """Figures of ``model`` at its input size.

    Args:
      model: a jvit model (has ``img_size``).
      variables: its variables or their shapes; ``None`` derives the shapes with ``jax.eval_shape``.

    Returns a dict: ``params_per_module`` (top-level ``params`` entry -> count), ``params_trainable``
    (the ``params`` collection), ``params_total`` (all collections, e.g. with BatchNorm statistics),
    ``flops_per_image``, ``gmacs_per_image``, ``activation_bytes_per_image`` (train mode) and
    ``img_size``. A figure the backend does not report is ``None``.
    """
    size = model.img_size
    image = lambda b: jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)

    def shapes(model, variables):
        if variables is None:
            variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image(1))
        variables = {k: v for k, v in variables.items() if k != "intermediates"}
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)

    abstract = shapes(model, variables)
    # FLOPs of a scanned model come from its unrolled twin (see the module docstring); its memory is
    # its own, and compiling the unrolled train step could take minutes.
    counted, counted_abstract = model, abstract
    if getattr(model, "scan_blocks", False):
        counted = model.clone(scan_blocks=False)
        counted_abstract = shapes(counted, None)
    forward = jax.jit(lambda v, x: counted.apply(v, x, train=False)).lower(counted_abstract, image(1)).compile()
    cost = forward.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per computation
    flops = cost.get("flops") if cost else None

    mutable = [c for c in abstract if c not in ("params", "frozen")]

    def train_loss(params, rest, x):
        out = model.apply(
            {"params": params, **rest}, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=mutable or False
        )
        outputs = out[0] if mutable else out  # logits, or a tuple of them (SP-ViT's token labeling)
        floats = [t for t in jax.tree.leaves(outputs) if jnp.issubdtype(t.dtype, jnp.floating)]
        return sum(jnp.sum(t.astype(jnp.float32)) for t in floats)

    def temp_bytes(batch: int) -> int | None:
        rest = {k: v for k, v in abstract.items() if k != "params"}
        grad = (
            jax.jit(jax.grad(train_loss), compiler_options=layers.barrier_compiler_options())
            .lower(abstract["params"], rest, image(batch))
            .compile()
        )
        memory = grad.memory_analysis()
        return None if memory is None else memory.temp_size_in_bytes

    one, two = temp_bytes(1), temp_bytes(2)
    return {
        "img_size": size,
        "params_per_module": {
            name: count_params(abstract["params"][name]) for name in sorted(abstract["params"], key=_natural)
        },
        "params_trainable": count_params(abstract["params"]),
        "params_total": count_params(abstract),
        "flops_per_image": None if flops is None else float(flops),
        "gmacs_per_image": None if flops is None else float(flops) / 2e9,
        "activation_bytes_per_image": None if one is None or two is None else two - one,
    }


def _natural(name: str) -> list[Any]:
    """Sort key putting ``blocks_2`` before ``blocks_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def format_summary(name: str, figures: dict[str, Any]) -> str:
    """The figures of :func:`summarize` as a readable table."""
    lines = [f"{name} ({figures['img_size']} px)", f"{'module':32s} {'params':>14s}"]
    lines += [f"{k:32s} {v:>14,d}" for k, v in figures["params_per_module"].items()]
    lines.append(f"{'trainable (params)':32s} {figures['params_trainable']:>14,d}")
    lines.append(f"{'total (all collections)':32s} {figures['params_total']:>14,d}")
    if figures["flops_per_image"] is not None:
        lines.append(
            f"FLOPs per image: {figures['flops_per_image'] / 1e9:.3f} G (XLA, multiply-add = 2), "
            f"{figures['gmacs_per_image']:.3f} GMACs (the papers' 'FLOPs')"
        )
    if figures["activation_bytes_per_image"] is not None:
        lines.append(f"train activation memory per image: {figures['activation_bytes_per_image'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``jvit summary NAME``: print the summary (or one JSON line with ``--json``)."""
    parser = argparse.ArgumentParser(prog="jvit summary", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="registered variant")
    parser.add_argument("--img-size", type=int, help="input side (default: the variant's first official one)")
    parser.add_argument("--num-classes", type=int, help="classifier width (default: the released head's)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    try:
        model = jvit.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 1
    figures = summarize(model)
    print(json.dumps({"model": args.model, **figures}) if args.json else format_summary(args.model, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
