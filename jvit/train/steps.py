"""The pure train and eval steps. The loop jits them with the state's and the batch's shardings.

The device half of the augmentation happens here, on the normalised batch and in the original's
order: random erasing (per image), then the loss's targets: Mixup/CutMix (per device shard of the
batch) on smoothed one-hot targets, or for token labeling the dense targets and the MixToken box. Every random draw
comes from
``fold_in(key(seed), step)``, so a resumed run replays its steps exactly.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jvit.data.inference import normalize
from jvit.train import batch_augment, optim, sharding
from jvit.train.losses import SoftmaxXent, TokenLabel
from jvit.train.state import TrainState


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss: SoftmaxXent | TokenLabel,
    config: ml_collections.ConfigDict,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    batch_shards: int = 1,
    per_device_mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step on a global batch ``{"image": uint8 [B, H, W, 3], "label": int [B], ...}``.

    Dropout and drop-path draw from the ``dropout`` rng ``fold_in(key(seed), step)`` and the
    augmentation (random erasing, then the loss's own :meth:`targets`: Mixup/CutMix or MixToken)
    from keys folded from it, so a step's randomness depends
    only on the seed and its index (resumed runs replay it exactly). Mutable
    collections (BatchNorm statistics) come back from the train-mode forward; ``frozen`` is only
    read. The EMA moves only on steps where the optimizer applied an update.

    ``batch_shards`` is the number of devices the batch is split over: batch-level augmentation
    (Mixup/CutMix) pairs examples within each device's rows, as the originals' per-GPU code does.
    With ``per_device_mesh`` the forward and backward pass run on each device's rows alone
    (:func:`_per_device`), so BatchNorm normalises with per-device statistics, as the originals' DDP
    training without SyncBN does; without it BatchNorm sees the global batch (SyncBN).

    Returns the new state and metrics ``loss``, ``grad_norm``, ``param_norm`` (scalars; the
    caller stops the run when one of them is not finite).
    """
    chex.assert_rank(batch["image"], 4)
    chex.assert_type(batch["image"], jnp.uint8)
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    erase_key, target_key = jax.random.split(jax.random.fold_in(rng, 1))
    images = normalize(batch["image"], mean, std)
    if config.augment.random_erasing:
        images = batch_augment.random_erasing(erase_key, images, config.augment.random_erasing)
    images, targets, apply_kwargs = loss.targets(
        target_key, images, batch, model=model, num_classes=num_classes, batch_shards=batch_shards
    )
    mutable = [k for k in state.collections if k != "frozen"]

    def loss_and_grads(params, collections, images, targets, apply_kwargs, rng):
        def loss_of(params):
            outputs, updates = model.apply(
                {"params": params, **collections},
                images,
                train=not config.model.train_in_eval_mode,
                rngs={"dropout": rng},
                mutable=mutable,
                **apply_kwargs,
            )
            return loss(outputs, targets).mean(), updates

        return jax.value_and_grad(loss_of, has_aux=True)(params)

    if per_device_mesh is not None:
        loss_and_grads = _per_device(loss_and_grads, per_device_mesh)
    (loss_value, updates), grads = loss_and_grads(state.params, state.collections, images, targets, apply_kwargs, rng)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    collections = {**state.collections, **updates}

    ema = state.ema
    if ema:
        decay = jnp.where(optim.applied_update(config, opt_state), config.ema.decay, 1.0)
        current = {"params": params, **collections}
        ema = {k: jax.tree.map(lambda e, x: decay * e + (1.0 - decay) * x, v, current[k]) for k, v in ema.items()}

    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, collections=collections, ema=ema)
    metrics = {"loss": loss_value, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    return new_state, metrics


def _per_device(loss_and_grads, mesh: Mesh):
    """Run ``loss_and_grads(params, collections, images, targets, apply_kwargs, rng)`` on each device's
    shard of the batch (``jax.shard_map`` over the batch axes) and average loss, gradients and the
    updated BatchNorm statistics over the devices: data parallelism as DDP does it.

    Per-example targets are split with the images, parameters and the rest are replicated; each
    device folds its index into the dropout key so its rows draw their own masks.
    """
    axes = sharding.BATCH_AXES

    def local(params, collections, images, targets, apply_kwargs, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
        out = loss_and_grads(params, collections, images, targets, apply_kwargs, rng)
        return jax.lax.pmean(out, axes)

    def run(params, collections, images, targets, apply_kwargs, rng):
        batch_spec = P(axes)
        target_specs = jax.tree.map(lambda t: batch_spec if jnp.ndim(t) else P(), targets)
        specs = (P(), P(), batch_spec, target_specs, P(), P())
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(
            params, collections, images, targets, apply_kwargs, rng
        )

    return run


def eval_step(
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    class_subset: tuple[int, ...] | None = None,
) -> dict[str, jax.Array]:
    """Sums over the real (``mask = 1``) rows of a padded batch: ``top1``, ``top5`` hits, ``loss``
    (cross-entropy of ``label``), ``count`` (real rows) and ``scored`` (rows the accuracies count).

    * ``class_subset`` (ImageNet-A): predictions are the top classes among these ids only.
    * ``label_set`` in the batch (ReaL, Beyer et al. 2020): a prediction is a hit when it is in the
      example's set; examples with an empty set are not scored.

    Top-5 is top-``min(5, K)``.
    """
    logits = model.apply(variables, normalize(batch["image"], mean, std), train=False)
    if isinstance(logits, (tuple, list)):
        raise TypeError(f"the model returned {len(logits)} outputs in eval mode; expected logits")
    logits = logits.astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if class_subset is not None:
        allowed = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(class_subset)].set(True)
        logits = jnp.where(allowed, logits, -jnp.inf)
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    if "label_set" in batch:
        hits = jnp.take_along_axis(batch["label_set"], top, axis=1)
        mask = mask * jnp.any(batch["label_set"], axis=1)
    else:
        hits = top == labels[:, None]
    return {
        "top1": jnp.sum(hits[:, 0] * mask),
        "top5": jnp.sum(jnp.any(hits, axis=1) * mask),
        "loss": jnp.sum(xent * batch["mask"]),
        "count": jnp.sum(batch["mask"]),
        "scored": jnp.sum(mask),
    }
