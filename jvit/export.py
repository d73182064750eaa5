"""Export a model to a TensorFlow SavedModel through ``jax.experimental.jax2tf``.

    jvit export --model hvt_s_1 --output hvt_s_1_savedmodel          # released weights
    jvit export --weights runs/hvt --ema --output hvt_tf               # a jvit.main run (or a converted dir)

The SavedModel's ``serving_default`` signature takes ``images``: uint8 ``[batch, img_size, img_size, 3]``
(RGB, already resized and centre-cropped to the model's input size, e.g. by
``jvit.data.eval_transform(name).crop(image)``), normalises them with the variant's mean/std and
returns ``logits`` (float32 ``[batch, num_classes]``) and ``probabilities`` (their softmax). The
variables are stored as TensorFlow variables, the computation as serialised StableHLO (jax2tf's
native serialisation), so the SavedModel runs on the platforms it was exported for (CPU by default).

Two limits come from the TensorFlow that reads the file (2.21 here), not from jvit:
- The batch size is fixed at export (``batch_size``, default 1). jax2tf can make it symbolic, but
  TF 2.21's ``XlaCallModule`` then fails to refine the shapes ("Module has dynamic shapes").
- jax serialises StableHLO for consumers at most 4 weeks older than itself, and then keeps ops
  such as ``chlo.erf`` (GELU) as ``composite`` ops TF 2.21 cannot read; the export therefore targets
  the StableHLO version of the 12-week compatibility window, which decomposes them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import tensorflow as tf
from jax._src import xla_bridge
from jax._src.export import _export
from jax._src.lib import _jax
from jax.experimental import jax2tf
from jaxlib.mlir.dialects import stablehlo

from jvit.data.inference import EvalTransform, normalize
from jvit.registry import PretrainedCfg


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
    """Serialise StableHLO for the 12-week compatibility window while converting (see the module
    docstring); jax has no public setting for the target version, so its serialiser is swapped."""
    original = _export._module_to_bytecode
    version = stablehlo.get_version_from_compatibility_requirement(stablehlo.StablehloCompatibilityRequirement.WEEK_12)

    def to_bytecode(module):
        return _jax.mlir.serialize_portable_artifact(module, version, xla_bridge.get_backend().serialize_with_sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def to_saved_model(
    model: nn.Module,
    variables: dict[str, Any],
    path: str | os.PathLike,
    cfg: EvalTransform | PretrainedCfg,
    batch_size: int = 1,
    platforms: Sequence[str] = ("cpu",),
) -> str:
    """Write ``model`` with ``variables`` as a SavedModel at ``path`` (must not exist); returns it.

    Args:
      model: the linen module (eval mode is used).
      variables: its variables.
      path: output directory.
      cfg: the eval transform of the weights (:func:`jvit.data.eval_transform`) or their
        :class:`jvit.registry.PretrainedCfg`: its ``img_size``
        fixes the input's spatial size and its ``mean``/``std`` the normalisation built into the graph.
      batch_size: the signature's batch size (fixed; see the module docstring).
      platforms: where the SavedModel will run (``"cpu"``, ``"cuda"``, ``"tpu"``); the default suits
        the ``tensorflow-cpu`` jvit depends on, whatever backend exports it.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose a new output directory")

    def forward(params, images):
        logits = model.apply(params, normalize(images, cfg.mean, cfg.std), train=False)
        return logits, jax.nn.softmax(logits, axis=-1)

    size = cfg.img_size
    converted = jax2tf.convert(forward, with_gradient=False, native_serialization_platforms=tuple(platforms))
    module = tf.Module()
    # tf.Variables (not constants) keep the weights out of the graph proto (which is limited to 2 GiB).
    module.params = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False), jax.device_get(variables))

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([batch_size, size, size, 3], tf.uint8, name="images")])
    def serve(images):
        logits, probs = converted(module.params, images)
        return {"logits": logits, "probabilities": probs}

    module.serve = serve
    with _stablehlo_for_tensorflow():
        tf.saved_model.save(module, path, signatures={"serving_default": serve})
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``jvit export``: load weights as ``jvit predict`` does and write a SavedModel."""
    from jvit.predict import load_predictor

    parser = argparse.ArgumentParser(prog="jvit export", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="SavedModel directory to create")
    parser.add_argument("--model", help="registered variant (not needed for a jvit directory)")
    parser.add_argument(
        "--weights",
        help="a .pth, a URL, a converted dir, a jvit.main run dir or its checkpoints/N "
        "(default: the registry's release, downloaded into $JVIT_CACHE)",
    )
    parser.add_argument("--ema", action="store_true", help="a run's EMA weights instead of the raw ones")
    parser.add_argument("--img-size", type=int, help="official resolution of the release (default: the first)")
    parser.add_argument("--cache-dir", help="download cache (default $JVIT_CACHE or ~/.cache/jvit)")
    parser.add_argument("--batch-size", type=int, default=1, help="the signature's (fixed) batch size")
    args = parser.parse_args(argv)
    try:
        p = load_predictor(args.model, args.weights, ema=args.ema, img_size=args.img_size, cache_dir=args.cache_dir)
        print(f"exporting {p.name} ({p.transform.img_size} px, {len(p.class_names)} classes) ...", file=sys.stderr)
        path = to_saved_model(p.model, p.variables, args.output, p.transform, args.batch_size)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {path} (signature serving_default: uint8 images [{args.batch_size}, {p.transform.img_size}, "
        f"{p.transform.img_size}, 3] -> logits, probabilities)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
