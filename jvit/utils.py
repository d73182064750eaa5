"""Helpers around a model's variables: abstract/real initialisation and parameter counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def dummy_input(model: nn.Module, batch: int = 1) -> jax.ShapeDtypeStruct:
    """The input signature ``[batch, img_size, img_size, 3]`` float32 of a registered model."""
    size = model.img_size
    h, w = (size, size) if isinstance(size, int) else size
    return jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)


def init_fn(model: nn.Module, batch: int = 1) -> Callable[[jax.Array], dict[str, Any]]:
    """``rng -> variables`` of ``model`` (every collection but ``intermediates``), on a zero input of
    :func:`dummy_input`'s signature; pure, so it can run under ``jax.jit`` or ``jax.eval_shape``."""
    x = dummy_input(model, batch)

    def init(rng: jax.Array) -> dict[str, Any]:
        return _drop_intermediates(model.init(rng, jnp.zeros(x.shape, x.dtype), train=False))

    return init


def init_variables(model: nn.Module, rng: jax.Array | int = 0, batch: int = 1) -> dict[str, Any]:
    """Freshly initialised variables of ``model`` (all collections: params, batch_stats, frozen, ...).

    An integer seed uses the ``unsafe_rbg`` generator: XLA's bit generator compiles in about half
    the time of threefry for the hundreds of initialisers of a full model, and weight init needs
    no stronger guarantees (values depend on the backend; pass a key for threefry).
    """
    if isinstance(rng, int):
        rng = jax.random.key(rng, impl="unsafe_rbg")
    return jax.jit(init_fn(model, batch))(rng)


def abstract_variables(model: nn.Module) -> dict[str, Any]:
    """Shapes and dtypes of every variable of ``model`` without computing anything."""
    return jax.eval_shape(init_fn(model), jax.random.key(0))


def _drop_intermediates(variables: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(variables).items() if k != "intermediates"}


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ``ShapeDtypeStruct``s."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))
