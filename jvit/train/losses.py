"""Training losses, chosen by ``config.loss.name``.

A loss is ``fn(outputs, labels, loss_config) -> per-example loss [B]`` where ``outputs`` is what the
model returns with ``train=True`` and ``labels`` is either integer class ids ``[B]`` or soft targets
``[B, K]`` (what mixup/cutmix produce). A new loss is one more entry in :data:`LOSSES`.
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
            "loss.name='softmax_xent' needs plain logits: use loss.name='token_label' for SP-ViT"
        )
    logits = outputs.astype(jnp.float32)
    targets = soft_targets(labels, logits.shape[-1], loss_config.label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def token_label(outputs: Any, labels: jax.Array, loss_config: Any) -> jax.Array:
    """Token labeling with image-level targets (Jiang et al., "All Tokens Matter", 2021, eq. 3-4):
    ``CE(cls_logits, t) + mean_tokens CE(aux_logits_i, t)`` with the image's (smoothed) target ``t``
    as every token's label and both weights 1, the original's ``TokenLabelCrossEntropy`` when it
    trains without dense label maps (``--token-label`` without ``--token-label-data``).

    ``outputs`` is the train-mode :class:`jvit.models.spvit.TokenLabelOutput` (``cls_logits [B, K]``,
    ``aux_logits [B, L, K]``). Dense per-token targets from a teacher's score maps and MixToken are
    not in this trainer yet.
    """
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
        raise TypeError("loss.name='token_label' needs a model returning (cls_logits, aux_logits) in train "
                        "mode, e.g. SP-ViT with its aux head; use loss.name='softmax_xent' for plain logits")
    cls_logits, aux_logits = (o.astype(jnp.float32) for o in outputs)
    targets = soft_targets(labels, cls_logits.shape[-1], loss_config.label_smoothing)
    aux = optax.softmax_cross_entropy(aux_logits, targets[:, None, :]).mean(axis=1)
    return optax.softmax_cross_entropy(cls_logits, targets) + aux


LOSSES: dict[str, Callable[[Any, jax.Array, Any], jax.Array]] = {
    "softmax_xent": softmax_xent,
    "token_label": token_label,
}
