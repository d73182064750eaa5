"""Training losses, chosen by ``config.loss.name``.

A loss is ``fn(outputs, labels, loss_config) -> per-example loss [B]`` where ``outputs`` is what the
model returns with ``train=True`` and ``labels`` is either integer class ids ``[B]`` or soft targets
``[B, K]`` (what mixup/cutmix produce). A new loss (e.g. SP-ViT's token labeling, which also takes
the model's auxiliary token logits) is one more entry in :data:`LOSSES`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def soft_targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    """Targets ``[B, K]``: smoothed one-hot of integer ``labels``, soft ``labels`` passed through.

    Smoothing follows timm: ``(1 - eps) * one_hot + eps / K``.
    """
    if labels.ndim == 2:
        return labels.astype(jnp.float32)
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), label_smoothing)


def softmax_xent(outputs: Any, labels: jax.Array, loss_config: Any) -> jax.Array:
    """Soft-target cross-entropy ``-sum_k t_k log softmax(z)_k`` (timm ``SoftTargetCrossEntropy`` /
    ``LabelSmoothingCrossEntropy``) on classification logits ``[B, K]``."""
    if isinstance(outputs, (tuple, list)):
        raise TypeError(
            f"the model returns {len(outputs)} outputs in train mode (e.g. SP-ViT's class and token logits); "
            "loss.name='softmax_xent' needs plain logits: choose a loss for that model's outputs"
        )
    logits = outputs.astype(jnp.float32)
    targets = soft_targets(labels, logits.shape[-1], loss_config.label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


LOSSES: dict[str, Callable[[Any, jax.Array, Any], jax.Array]] = {"softmax_xent": softmax_xent}
