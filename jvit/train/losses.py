"""Training losses, chosen by ``config.loss.name``.

A loss is ``fn(outputs, targets) -> per-example loss [B]``: ``outputs`` is what the model returns
with ``train=True``; ``targets`` is what :func:`jvit.train.steps.make_targets` built from the batch
(smoothed, possibly Mixup/CutMix-mixed soft targets ``targets["class"] [B, K]``, and for token
labeling the dense targets and the MixToken ``lam``). A new loss is one more entry in :data:`LOSSES`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jvit.train import token_labels


def soft_targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    """Smoothed one-hot targets ``[B, K]`` of integer ``labels``: ``(1 - eps) one_hot + eps / K``
    (timm ``mixup_target`` / ``LabelSmoothingCrossEntropy``)."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), label_smoothing)


def softmax_xent(outputs: Any, targets: dict[str, jax.Array]) -> jax.Array:
    """Soft-target cross-entropy ``-sum_k t_k log softmax(z)_k`` (timm ``SoftTargetCrossEntropy``)
    of classification logits ``[B, K]`` against ``targets["class"]``."""
    if isinstance(outputs, (tuple, list)):
        raise TypeError(
            f"the model returns {len(outputs)} outputs in train mode (e.g. SP-ViT's class and token logits); "
            "loss.name='softmax_xent' needs plain logits: use loss.name='token_label' for SP-ViT"
        )
    return optax.softmax_cross_entropy(outputs.astype(jnp.float32), targets["class"])


def token_label(outputs: Any, targets: dict[str, jax.Array]) -> jax.Array:
    """Token labeling (Jiang et al., "All Tokens Matter", 2021, eq. 3-4; the original's
    ``TokenLabelCrossEntropy``): ``CE(cls_logits, t_cls) + mean_tokens CE(aux_logits_i, t_i)``.

    With dense score maps (``targets["tokens"]``) ``t_cls`` is the teacher's crop-level label
    ``targets["crop"]`` and ``t_i`` the per-token labels; without them both are the image's smoothed
    label (the original's ``--token-label`` without ``--token-label-data``). With MixToken the class
    target is mixed with ``targets["lam"]``; token targets are not (the model un-mixes the aux logits).
    ``outputs`` is the train-mode :class:`jvit.models.spvit.TokenLabelOutput`.
    """
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
        raise TypeError("loss.name='token_label' needs a model returning (cls_logits, aux_logits) in train "
                        "mode, e.g. SP-ViT with its aux head; use loss.name='softmax_xent' for plain logits")
    cls_logits, aux_logits = (o.astype(jnp.float32) for o in outputs)
    dense = {k: targets[k] for k in ("image", "crop", "tokens") if k in targets}
    return token_labels.token_label_loss(cls_logits, aux_logits, dense or targets["class"], targets["lam"])


LOSSES: dict[str, Callable[[Any, dict[str, jax.Array]], jax.Array]] = {
    "softmax_xent": softmax_xent,
    "token_label": token_label,
}
