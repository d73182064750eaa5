"""The pure train and eval steps. The loop jits them with the state's and the batch's shardings.

The device half of the augmentation happens here, on the normalised batch and in the original's
order: random erasing (per image), then Mixup/CutMix (per batch) on smoothed one-hot targets, or
for token labeling the dense targets and the MixToken box. Every random draw comes from
``fold_in(key(seed), step)``, so a resumed run replays its steps exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jvit.train import batch_augment, optim, token_labels
from jvit.train.losses import soft_targets
from jvit.train.state import TrainState

Loss = Callable[[Any, dict[str, jax.Array]], jax.Array]


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` -> float32 ``(x / 255 - mean) / std`` (torchvision ToTensor + Normalize)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def make_targets(
    rng: jax.Array,
    images: jax.Array,
    batch: dict[str, jax.Array],
    *,
    num_classes: int,
    config: ml_collections.ConfigDict,
    token_grid: tuple[int, int] | None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array | None]:
    """Augment normalised ``images`` and build the loss targets; returns ``(images, targets, mix_box)``.

    * random erasing (timm ``RandomErasing``, mode 'pixel') with ``augment.random_erasing``;
    * ``targets["class"]``: smoothed one-hot labels, mixed with the batch flipped by Mixup/CutMix
      (timm ``Mixup``, mode 'batch') when an alpha is set;
    * token labeling: ``targets["lam"]`` (1 without MixToken) and, when the batch carries score
      maps, the dense ``image`` / ``crop`` / ``tokens`` targets on the ``token_grid``; ``mix_box``
      is the MixToken box (``None`` when off).
    """
    a, smoothing = config.augment, config.loss.label_smoothing
    erase_key, mix_key, token_key = jax.random.split(rng, 3)
    if a.random_erasing:
        images = batch_augment.random_erasing(erase_key, images, a.random_erasing)
    targets = {"class": soft_targets(batch["label"], num_classes, smoothing)}
    if a.mixup_alpha or a.cutmix_alpha:
        images, targets["class"], _ = batch_augment.mixup_cutmix(
            mix_key, images, targets["class"], mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
            prob=a.mixup_prob, switch_prob=a.mixup_switch_prob)
    mix_box = None
    if config.loss.name == "token_label":
        if token_grid is None:
            raise ValueError("loss.name='token_label' needs a model with a token grid (SP-ViT with its aux head)")
        targets["lam"] = jnp.float32(1.0)
        if a.mix_token:
            mix_box = batch_augment.mix_token_box(token_key, *token_grid)
            targets["lam"] = batch_augment.mix_token_lam(mix_box, token_grid[0] * token_grid[1])
        if "score_map" in batch:
            if token_grid[0] != token_grid[1]:
                raise ValueError(f"dense token labels need a square token grid, got {token_grid}")
            targets.update(token_labels.dense_targets(
                batch["score_map"], batch["crop_box"], batch["label"], num_classes=num_classes,
                label_size=token_grid[0], smoothing=smoothing,
                transposed_crop=config.loss.token_label_transposed_crop))
    return images, targets, mix_box


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
    num_classes: int,
    token_grid: tuple[int, int] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step on a global batch ``{"image": uint8 [B, H, W, 3], "label": int [B], ...}``.

    Dropout and drop-path draw from the ``dropout`` rng ``fold_in(key(seed), step)`` and the
    augmentation (:func:`make_targets`) from a key folded from it, so a step's randomness depends
    only on the seed and its index (resumed runs replay it exactly). Mutable
    collections (BatchNorm statistics) come back from the train-mode forward; ``frozen`` is only
    read. The EMA moves only on steps where the optimizer applied an update.

    Returns the new state and metrics ``loss``, ``grad_norm``, ``param_norm`` (scalars; the
    caller stops the run when one of them is not finite).
    """
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    images, targets, mix_box = make_targets(jax.random.fold_in(rng, 1), normalize(batch["image"], mean, std), batch,
                                            num_classes=num_classes, config=config, token_grid=token_grid)
    mutable = [k for k in state.collections if k != "frozen"]
    extra = {} if mix_box is None else {"mix_box": mix_box}

    def loss_of(params):
        outputs, updates = model.apply({"params": params, **state.collections}, images,
                                       train=not config.model.train_in_eval_mode,
                                       rngs={"dropout": rng}, mutable=mutable, **extra)
        return loss_fn(outputs, targets).mean(), updates

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
