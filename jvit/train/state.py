"""The train state, the model built from the config, and starting from converted weights."""

from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

import jvit
import jvit.checkpoint
import jvit.convert
from jvit.errors import ConfigError
from jvit.models import resize

log = logging.getLogger("jvit.train")


class TrainState(flax.struct.PyTreeNode):
    """Everything a train step reads and writes.

    Attributes:
      step: train steps taken (batches consumed), int32 scalar.
      params: the ``params`` collection, the only one optimised.
      opt_state: the optax state of ``params``.
      collections: every other variable collection (``batch_stats``, ``frozen``, ...), carried
        through steps; the mutable ones (all but ``frozen``) are updated by the train forward.
      ema: exponential moving averages, ``{"params": ..., ["batch_stats": ...]}``; ``{}`` when off.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    collections: dict[str, Any]
    ema: dict[str, Any]

    def variables(self) -> dict[str, Any]:
        """The raw model's variables for ``model.apply``."""
        return {"params": self.params, **self.collections}

    def ema_variables(self) -> dict[str, Any]:
        """The EMA model's variables (non-averaged collections taken from the raw model)."""
        return {**self.collections, **self.ema}


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Factory overrides: ``model.kwargs`` plus the compute dtype when it is not float32 and the
    block rematerialisation (``model.remat``) when it is not ``'none'``."""
    kwargs = config.model.kwargs.to_dict()
    if config.model.dtype != "float32":
        kwargs["dtype"] = jnp.dtype(config.model.dtype)
    if config.model.remat != "none":
        kwargs["remat"] = config.model.remat
    return kwargs


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """``jvit.create_model(model.name, num_classes, model.img_size, **model_kwargs(config))``."""
    return jvit.create_model(
        config.model.name, num_classes=num_classes, img_size=config.model.img_size, **model_kwargs(config)
    )


def ema_of(variables: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The collections the EMA tracks, initialised as copies of the model's."""
    if not config.ema.decay:
        return {}
    names = ["params"] + (["batch_stats"] if config.ema.batch_stats and "batch_stats" in variables else [])
    return {k: jax.tree.map(jnp.copy, variables[k]) for k in names}


def new_state(
    variables: dict[str, Any], tx: optax.GradientTransformation, config: ml_collections.ConfigDict
) -> TrainState:
    """Step 0 from initial variables (pure; jitted by the caller with the state's shardings)."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        collections={k: v for k, v in variables.items() if k != "params"},
        ema=ema_of(variables, config),
    )


def load_pretrained(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Host variables from ``config.init_from``: a jvit checkpoint directory, or an original ``.pth``."""
    path = os.path.expanduser(config.init_from)
    if os.path.isdir(path):
        # A run directory's EMA weights are asked for as init_weights_key="ema".
        variables, meta = jvit.checkpoint.load_variables(path, ema=config.init_weights_key == "ema")
        if meta.get("model") != config.model.name:
            log.warning("init_from %s holds %r weights, training %r", path, meta.get("model"), config.model.name)
        return variables
    if not os.path.isfile(path):
        raise ConfigError(f"config.init_from={config.init_from!r}: no such file or directory")
    return jvit.convert.load_torch_checkpoint(
        path,
        config.model.name,
        img_size=config.model.img_size,
        weights_key=config.init_weights_key or None,
        **model_kwargs(config),
    )


def merge_pretrained(
    fresh: dict[str, Any], loaded: dict[str, Any], num_classes: int
) -> tuple[dict[str, Any], list[str]]:
    """``fresh`` with every leaf replaced by ``loaded``'s, except classifier leaves whose class
    dimension differs (those keep their fresh init). Returns ``(variables, reinitialised names)``.

    ``loaded`` is first put in ``fresh``'s block layout (unrolled ``blocks_<i>`` or stacked ``blocks`` of a
    ``scan_blocks`` model, :func:`jvit.convert.layout.match_layout`). A ``pos_embed`` made for another input
    size is resized (:func:`jvit.models.resize.fit_pos_embed`).
    Otherwise a leaf may differ from the checkpoint only where the new model's dimension is ``num_classes``;
    any other difference (missing or extra names, other shapes) raises, naming every one.
    """
    flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
    flat_loaded = traverse_util.flatten_dict(jvit.convert.layout.match_layout(loaded, fresh), sep="/")
    errors = [f"missing in the checkpoint: {k}" for k in flat_fresh if k not in flat_loaded]
    errors += [f"not in the model: {k}" for k in flat_loaded if k not in flat_fresh]
    merged, reinit = {}, []
    for name, value in flat_fresh.items():
        if name not in flat_loaded:
            continue
        old = flat_loaded[name]
        if name.startswith("params/") and tuple(old.shape) != tuple(value.shape):
            resized = resize.fit_pos_embed(name, np.asarray(old), tuple(value.shape))
            old = old if resized is None else resized
        if tuple(old.shape) == tuple(value.shape):
            merged[name] = np.asarray(old, dtype=value.dtype)
        elif len(old.shape) == len(value.shape) and all(
            a == b or b == num_classes for a, b in zip(old.shape, value.shape)
        ):
            merged[name] = value
            reinit.append(name)
        else:
            errors.append(f"{name}: checkpoint shape {tuple(old.shape)}, model shape {tuple(value.shape)}")
    if errors:
        raise ConfigError("init_from does not fit the model:\n  " + "\n  ".join(errors))
    return traverse_util.unflatten_dict(merged, sep="/"), reinit
