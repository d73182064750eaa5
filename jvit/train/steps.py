"""The pure train and eval steps. The loop jits them with the state's and the batch's shardings."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jvit.train import optim
from jvit.train.state import TrainState

Loss = Callable[[Any, jax.Array, Any], jax.Array]


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` -> float32 ``(x / 255 - mean) / std`` (torchvision ToTensor + Normalize)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: Loss,
    config: ml_collections.ConfigDict,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step on a global batch ``{"image": uint8, "label": int [B] or soft [B, K]}``.

    Dropout and drop-path draw from the ``dropout`` rng ``fold_in(key(seed), step)``, so a step's
    randomness depends only on the seed and its index (resumed runs replay it exactly). Mutable
    collections (BatchNorm statistics) come back from the train-mode forward; ``frozen`` is only
    read. The EMA moves only on steps where the optimizer applied an update.

    Returns the new state and metrics ``loss``, ``grad_norm``, ``param_norm`` (scalars; the
    caller stops the run when one of them is not finite).
    """
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    images = normalize(batch["image"], mean, std)
    mutable = [k for k in state.collections if k != "frozen"]

    def loss_of(params):
        outputs, updates = model.apply({"params": params, **state.collections}, images, train=True,
                                       rngs={"dropout": rng}, mutable=mutable)
        return loss_fn(outputs, batch["label"], config.loss).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    collections = {**state.collections, **updates}

    ema = state.ema
    if ema:
        decay = jnp.where(optim.applied_update(config, opt_state), config.ema.decay, 1.0)
        current = {"params": params, **collections}
        ema = {k: jax.tree.map(lambda e, x: decay * e + (1.0 - decay) * x, v, current[k]) for k, v in ema.items()}

    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, collections=collections, ema=ema)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    return new_state, metrics


def eval_step(
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, jax.Array]:
    """Sums over the real (``mask = 1``) rows of a padded batch: ``top1``, ``top5`` hits, ``loss``
    (cross-entropy) and ``count``. Top-5 is top-``min(5, K)``."""
    logits = model.apply(variables, normalize(batch["image"], mean, std), train=False)
    if isinstance(logits, (tuple, list)):
        raise TypeError(f"the model returned {len(logits)} outputs in eval mode; expected logits")
    logits = logits.astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    k = min(5, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    hits = top == labels[:, None]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "top1": jnp.sum(hits[:, 0] * mask),
        "top5": jnp.sum(jnp.any(hits, axis=1) * mask),
        "loss": jnp.sum(xent * mask),
        "count": jnp.sum(mask),
    }
