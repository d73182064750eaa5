"""The one SGD train step every family's "jit forward + train step" test runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def images(model, batch: int = 2) -> jax.Array:
    """A fixed batch of random NHWC images at the model's input size."""
    return jax.random.normal(jax.random.key(1), (batch, model.img_size, model.img_size, 3))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sgd_step(model, x: jax.Array, loss: Callable[[Any, jax.Array], jax.Array] = cross_entropy, **apply_kwargs):
    """``step(variables, rng) -> (loss, grads, new variables)``: one train-mode SGD step (lr 0.01) on
    ``x`` with labels ``arange(B) % num_classes``; dropout and drop path draw from ``rng``, BatchNorm
    statistics (where the model has them) are updated. ``loss(outputs, labels)`` scores the model's
    train-mode outputs; ``apply_kwargs`` go to ``model.apply``."""
    labels = jnp.arange(x.shape[0]) % model.num_classes

    def step(variables, rng):
        def loss_fn(params):
            out, updates = model.apply(
                {**variables, "params": params},
                x,
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
                **apply_kwargs,
            )
            return loss(out, labels), updates

        (value, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.01 * g, variables["params"], grads)
        return value, grads, {**variables, **updates, "params": params}

    return step
