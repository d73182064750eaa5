"""Transfer-learning controls on the optimizer: layer-wise learning-rate decay and frozen parameters.

Both are one per-parameter factor on the optimizer's final updates (after AdamW's lr and decoupled
weight decay), which is what timm's parameter groups with an ``lr_scale`` compute:

* **layer-wise lr decay** (Clark et al., ELECTRA 2020, section 3; BEiT, Bao et al. 2022, section 2.4):
  with ``L`` transformer blocks numbered in forward order across stages, the embedding (everything
  before the first block) has layer id 0, block ``i`` id ``i + 1``, the rest (final norm, heads) id
  ``L + 1``; a parameter's lr is scaled by ``layer_decay ** (L + 1 - id)``. A stage's downsampling
  layer (STViT ``layers_s/downsample``) feeds the next stage, so it takes the next block's id.
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
import optax

from jvit.errors import ConfigError

_BLOCK = re.compile(r"(?:^|/)(?:layers_(\d+)/)?blocks_(\d+)/")
_DOWNSAMPLE = re.compile(r"(?:^|/)layers_(\d+)/downsample/")


def _path(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def layer_ids(params: Any) -> tuple[Any, int]:
    """``(tree of layer ids like params, number of blocks L)`` for layer-wise lr decay (module docstring)."""
    paths = [_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    blocks = sorted({(int(m[1] or 0), int(m[2])) for m in map(_BLOCK.search, paths) if m})
    index = {b: i for i, b in enumerate(blocks)}
    last_of_stage = {stage: i for i, (stage, _) in enumerate(blocks)}

    def layer_id(path, _) -> int:
        name = _path(path)
        block = _BLOCK.search(name)
        if block:
            return index[(int(block[1] or 0), int(block[2]))] + 1
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

    def scale(path, layer_id) -> float:
        if trainable and not any(p.search(_path(path)) for p in trainable):
            return 0.0
        return float(o.layer_decay) ** (depth + 1 - layer_id)

    return jax.tree_util.tree_map_with_path(scale, ids)


def check(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` for bad fine-tuning fields (named)."""
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
    if config.model.train_in_eval_mode and config.loss.name == "token_label":
        errors.append("model.train_in_eval_mode cannot train loss.name='token_label' (the eval forward has no "
                      "token outputs)")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def scale_updates(tx: optax.GradientTransformation, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``tx`` followed by the per-parameter factors of :func:`update_scales`; ``tx`` itself when
    neither layer decay nor ``trainable`` is configured. A parameter matching no ``trainable`` regex
    is an error only if nothing matches at all (a typo would otherwise freeze the whole model)."""
    check(config)
    o = config.optimizer
    if o.layer_decay == 1 and not o.trainable:
        return tx

    def update(updates, state, params=None):
        scales = update_scales(updates, config)
        if o.trainable and not any(jax.tree.leaves(scales)):
            names = [_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(updates)]
            raise ConfigError(f"optimizer.trainable={tuple(o.trainable)} matches no parameter; names look like "
                              f"{names[:3] + names[-3:]}")
        return jax.tree.map(lambda u, s: u * s if s != 1 else u, updates, scales), state

    return optax.chain(tx, optax.GradientTransformation(lambda params: optax.EmptyState(), update))


def export(config: ml_collections.ConfigDict, workdir: str, output: str, *, ema: bool = False) -> str:
    """Write the latest checkpoint of the run in ``workdir`` (trained with ``config``) as a converted-style
    directory (:func:`jvit.checkpoint.save_variables`): the model's variables (the EMA's with ``ema``) and
    its name, classes and input size, so ``init_from``, ``jvit.viz`` and inference load it like a converted
    release. Returns the directory."""
    import jvit.checkpoint
    from jvit.train import loop, optim
    from jvit.train.checkpointing import Checkpointer

    exp = loop.setup(config)
    tx, _ = optim.make_optimizer(config, exp.steps_per_epoch / config.grad_accum_steps)
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, use_async=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory} to export")
        abstract, shardings, _ = loop.abstract_state(exp, tx)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state = ckpt.restore(step, target, None)
    finally:
        ckpt.close()
    if ema and not state.ema:
        raise ValueError("ema=True but the run kept no EMA (config.ema.decay = 0)")
    variables = jax.device_get(state.ema_variables() if ema else state.variables())
    return jvit.checkpoint.save_variables(output, variables, {
        "model": config.model.name, "num_classes": exp.num_classes, "img_size": exp.img_size,
        "source": os.path.abspath(workdir), "step": step, "model_kwargs": config.model.kwargs.to_dict(),
    })
