"""Transfer-learning controls on the optimizer: layer-wise learning-rate decay and frozen parameters.

Both are one per-parameter factor on the optimizer's final updates (after AdamW's lr and decoupled
weight decay), which is what timm's parameter groups with an ``lr_scale`` compute:

* **layer-wise lr decay** (Clark et al., ELECTRA 2020, section 3; BEiT, Bao et al. 2022, section 2.4):
  with ``L`` transformer blocks numbered in forward order across stages, the embedding (everything
  before the first block) has layer id 0, block ``i`` id ``i + 1``, the rest (final norm, heads) id
  ``L + 1``; a parameter's lr is scaled by ``layer_decay ** (L + 1 - id)``. A stage's downsampling
  layer (STViT ``layers_s/downsample``) feeds the next stage, so it takes the next block's id.
  A stacked block stack (``blocks/...`` leaves with a leading block axis, ``model.kwargs.scan_blocks``)
  gets per-block ids and factors along that axis, the same as the unrolled ``blocks_<i>``.
* **frozen parameters**: with ``optimizer.trainable`` (regexes on ``'a/b/c'`` param paths) set, every
  other parameter gets factor 0: no update and so no weight decay either (a linear probe with
  ``trainable=('^head/',)``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

import jvit.checkpoint
from jvit.errors import ConfigError

_BLOCK = re.compile(r"(?:^|/)(?:layers_(\d+)/)?blocks_(\d+)/")
_STACKED = re.compile(r"(?:^|/)(?:layers_(\d+)/)?blocks(?:_(\d+)-\d+)?/")
_DOWNSAMPLE = re.compile(r"(?:^|/)layers_(\d+)/downsample/")


def _path(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def layer_ids(params: Any) -> tuple[Any, int]:
    """``(tree of layer ids like params, number of blocks L)`` for layer-wise lr decay (module docstring).

    A stacked leaf (``blocks/...`` or a run ``blocks_<a>-<b>/...``, ``[depth, ...]``) gets an integer array
    of ids ``[depth, 1, ...]``.
    """
    leaves = [(_path(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(params)]
    blocks = {(int(m[1] or 0), int(m[2])) for m in (_BLOCK.search(name) for name, _ in leaves) if m}
    for name, leaf in leaves:
        if m := _STACKED.search(name):
            blocks |= {(int(m[1] or 0), int(m[2] or 0) + i) for i in range(leaf.shape[0])}
    blocks = sorted(blocks)
    index = {b: i for i, b in enumerate(blocks)}
    last_of_stage = {stage: i for i, (stage, _) in enumerate(blocks)}

    def layer_id(path, leaf) -> int | np.ndarray:
        name = _path(path)
        block = _BLOCK.search(name)
        if block:
            return index[(int(block[1] or 0), int(block[2]))] + 1
        stacked = _STACKED.search(name)
        if stacked:
            start = int(stacked[2] or 0)
            ids = [index[(int(stacked[1] or 0), start + i)] + 1 for i in range(leaf.shape[0])]
            return np.asarray(ids).reshape((-1,) + (1,) * (leaf.ndim - 1))
        down = _DOWNSAMPLE.search(name)
        if down and int(down[1]) in last_of_stage:
            return last_of_stage[int(down[1])] + 2
        first = name.split("/")[0]
        if first.startswith(("patch_embed", "pos_embed", "cls_token", "visual_tokens", "stem")):
            return 0
        return len(blocks) + 1

    return jax.tree_util.tree_map_with_path(layer_id, params), len(blocks)


def update_scales(params: Any, config: ml_collections.ConfigDict) -> Any:
    """Per-parameter factors on the updates: ``layer_decay ** (L + 1 - id)``, times 0 outside ``trainable``."""
    o = config.optimizer
    trainable = [re.compile(p) for p in o.trainable]
    ids, depth = layer_ids(params)

    def scale(path, layer_id) -> float | np.ndarray:
        if trainable and not any(p.search(_path(path)) for p in trainable):
            return 0.0
        return float(o.layer_decay) ** (depth + 1 - layer_id)

    return jax.tree_util.tree_map_with_path(scale, ids)


def validate(config: ml_collections.ConfigDict) -> list[str]:
    """Errors of the fine-tuning fields of the ``optimizer`` section (each names the field)."""
    o = config.optimizer
    errors = []
    if not 0 < o.layer_decay <= 1:
        errors.append(f"optimizer.layer_decay={o.layer_decay} must be in (0, 1] (1: off)")
    if o.warmup_steps < 0 or o.decay_steps < 0:
        errors.append(f"optimizer.warmup_steps={o.warmup_steps}, decay_steps={o.decay_steps} must be >= 0")
    for pattern in o.trainable:
        try:
            re.compile(pattern)
        except re.error as e:
            errors.append(f"optimizer.trainable entry {pattern!r} is not a regex: {e}")
    return errors


def scale_updates(tx: optax.GradientTransformation, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``tx`` followed by the per-parameter factors of :func:`update_scales`; ``tx`` itself when
    neither layer decay nor ``trainable`` is configured. A parameter matching no ``trainable`` regex
    is an error only if nothing matches at all (a typo would otherwise freeze the whole model)."""
    o = config.optimizer
    if o.layer_decay == 1 and not o.trainable:
        return tx

    def update(updates, state, params=None):
        scales = update_scales(updates, config)
        if o.trainable and not any(np.any(s) for s in jax.tree.leaves(scales)):
            names = [_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(updates)]
            raise ConfigError(
                f"optimizer.trainable={tuple(o.trainable)} matches no parameter; names look like "
                f"{names[:3] + names[-3:]}"
            )
        return jax.tree.map(lambda u, s: u if np.all(s == 1) else u * s, updates, scales), state

    return optax.chain(tx, optax.GradientTransformation(lambda params: optax.EmptyState(), update))


def export(workdir: str, output: str, *, ema: bool = False) -> str:
    """Write the latest checkpoint of the run in ``workdir`` as a converted-style directory
    (:func:`jvit.checkpoint.save_variables`): one portable copy of the model's variables (the EMA's with
    ``ema``) with the run's metadata (model, classes, input size, constructor overrides). A run directory
    itself also loads everywhere a converted one does; this is for shipping the weights alone."""
    variables, metadata = jvit.checkpoint.load_variables(workdir, ema=ema)
    return jvit.checkpoint.save_variables(output, variables, {**metadata, "source": os.path.abspath(workdir)})
