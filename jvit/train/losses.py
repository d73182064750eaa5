"""Training losses, chosen by ``config.loss.name``. Each loss owns its targets.

A loss is an object with three methods, so the train step never branches on which loss it runs:

* ``validate(config) -> list[str]``: the config fields it needs or rejects (e.g. MixToken only with
  token labeling, Mixup only with soft-target cross-entropy);
* ``check_model(model)``: fails early, naming the model, when it cannot train with this loss;
* ``targets(rng, images, batch, *, model, num_classes, batch_shards) -> (images, targets, apply_kwargs)``: the
  batch-level augmentation that changes the targets (Mixup/CutMix, MixToken) and the targets
  themselves; ``apply_kwargs`` go to ``model.apply`` (the MixToken box);
* ``__call__(outputs, targets) -> [B]``: the per-example loss of the model's train-mode outputs.

:func:`make_loss` builds the configured one; a new loss is one more class in :data:`LOSSES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jvit.train import batch_augment, token_labels

Targets = dict[str, jax.Array]


def soft_targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    """Smoothed one-hot targets ``[B, K]`` of integer ``labels``: ``(1 - eps) one_hot + eps / K``
    (timm ``mixup_target`` / ``LabelSmoothingCrossEntropy``)."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), label_smoothing)


@dataclasses.dataclass(frozen=True)
class SoftmaxXent:
    """Soft-target cross-entropy ``-sum_k t_k log softmax(z)_k`` (timm ``SoftTargetCrossEntropy``) of
    classification logits ``[B, K]``, with label smoothing and optional Mixup/CutMix (timm ``Mixup``,
    mode 'batch': the targets are mixed like the images), drawn per device shard of the batch, as the
    originals' per-GPU ``Mixup`` does."""

    name: ClassVar[str] = "softmax_xent"
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> SoftmaxXent:
        a = config.augment
        return cls(config.loss.label_smoothing, a.mixup_alpha, a.cutmix_alpha, a.mixup_prob, a.mixup_switch_prob)

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> list[str]:
        errors = []
        if config.augment.mix_token:
            errors.append("augment.mix_token needs loss.name='token_label' (a model with a token-labeling aux head)")
        if config.input.token_label_dir:
            errors.append("input.token_label_dir needs loss.name='token_label'")
        return errors

    @staticmethod
    def check_model(model: nn.Module) -> None:
        """Any classifier returning logits in train mode fits."""

    def targets(
        self,
        rng: jax.Array,
        images: jax.Array,
        batch: dict[str, jax.Array],
        *,
        model: nn.Module,
        num_classes: int,
        batch_shards: int = 1,
    ) -> tuple[jax.Array, Targets, dict[str, Any]]:
        """Smoothed one-hot ``targets["class"]``, mixed with the flipped batch when an alpha is set; each
        of the ``batch_shards`` device shards of the batch is mixed on its own."""
        del model
        target = soft_targets(batch["label"], num_classes, self.label_smoothing)
        if self.mixup_alpha or self.cutmix_alpha:
            images, target, _ = batch_augment.mixup_cutmix_per_shard(
                rng,
                images,
                target,
                shards=batch_shards,
                mixup_alpha=self.mixup_alpha,
                cutmix_alpha=self.cutmix_alpha,
                prob=self.mixup_prob,
                switch_prob=self.mixup_switch_prob,
            )
        return images, {"class": target}, {}

    def __call__(self, outputs: Any, targets: Targets) -> jax.Array:
        if isinstance(outputs, (tuple, list)):
            raise TypeError(
                f"the model returns {len(outputs)} outputs in train mode (e.g. SP-ViT's class and token logits); "
                "loss.name='softmax_xent' needs plain logits: use loss.name='token_label' for SP-ViT"
            )
        return optax.softmax_cross_entropy(outputs.astype(jnp.float32), targets["class"])


@dataclasses.dataclass(frozen=True)
class TokenLabel:
    """Token labeling (Jiang et al., "All Tokens Matter", 2021, eq. 3-4; the original's
    ``TokenLabelCrossEntropy``): ``CE(cls_logits, t_cls) + mean_tokens CE(aux_logits_i, t_i)``.

    With dense score maps in the batch (``score_map``, ``crop_box``) ``t_cls`` is the teacher's
    crop-level label and ``t_i`` the per-token labels pooled onto the model's ``token_grid``;
    without them both are the image's smoothed label (the original's ``--token-label`` without
    ``--token-label-data``). With MixToken the class target is mixed with ``lam = 1 - box area / L``;
    token targets are not (the model un-mixes the aux logits). The model's train-mode output is
    :class:`jvit.models.spvit.TokenLabelOutput`.
    """

    name: ClassVar[str] = "token_label"
    label_smoothing: float = 0.0
    mix_token: bool = False
    transposed_crop: bool = True

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> TokenLabel:
        return cls(config.loss.label_smoothing, config.augment.mix_token, config.loss.token_label_transposed_crop)

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> list[str]:
        errors = []
        if config.augment.mixup_alpha or config.augment.cutmix_alpha:
            errors.append(
                "Mixup/CutMix with loss.name='token_label' is not supported (SP-ViT/LV-ViT train with MixToken instead)"
            )
        if config.input.token_label_dir and config.input.train_preprocess != "augment":
            errors.append("input.token_label_dir needs input.train_preprocess='augment'")
        if config.model.train_in_eval_mode:
            errors.append(
                "model.train_in_eval_mode cannot train loss.name='token_label' (the eval forward has no token outputs)"
            )
        return errors

    def check_model(self, model: nn.Module) -> None:
        """Fail at setup, naming the model, when it has no token grid."""
        self.grid(model)

    @staticmethod
    def grid(model: nn.Module) -> tuple[int, int]:
        """The patch-token grid the dense targets and the MixToken box live on."""
        try:
            return tuple(model.token_grid)
        except AttributeError:
            raise TypeError(
                f"loss.name='token_label' needs a model with a token grid and an aux head "
                f"(SP-ViT); {type(model).__name__} has none"
            ) from None

    def targets(
        self,
        rng: jax.Array,
        images: jax.Array,
        batch: dict[str, jax.Array],
        *,
        model: nn.Module,
        num_classes: int,
        batch_shards: int = 1,
    ) -> tuple[jax.Array, Targets, dict[str, Any]]:
        """``class`` and ``lam`` targets, the dense ``image``/``crop``/``tokens`` targets when the batch
        carries score maps, and the MixToken box for ``model.apply`` (one box for the whole batch:
        MixToken swaps token regions inside the model, ``batch_shards`` is not used)."""
        del batch_shards
        rows, cols = self.grid(model)
        targets = {"class": soft_targets(batch["label"], num_classes, self.label_smoothing), "lam": jnp.float32(1.0)}
        apply_kwargs = {}
        if self.mix_token:
            box = batch_augment.mix_token_box(rng, rows, cols)
            targets["lam"] = batch_augment.mix_token_lam(box, rows * cols)
            apply_kwargs["mix_box"] = box
        if "score_map" in batch:
            if rows != cols:
                raise ValueError(f"dense token labels need a square token grid, got {(rows, cols)}")
            targets.update(
                token_labels.dense_targets(
                    batch["score_map"],
                    batch["crop_box"],
                    batch["label"],
                    num_classes=num_classes,
                    label_size=rows,
                    smoothing=self.label_smoothing,
                    transposed_crop=self.transposed_crop,
                )
            )
        return images, targets, apply_kwargs

    def __call__(self, outputs: Any, targets: Targets) -> jax.Array:
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise TypeError(
                "loss.name='token_label' needs a model returning (cls_logits, aux_logits) in train "
                "mode, e.g. SP-ViT with its aux head; use loss.name='softmax_xent' for plain logits"
            )
        cls_logits, aux_logits = (o.astype(jnp.float32) for o in outputs)
        dense = {k: targets[k] for k in ("image", "crop", "tokens") if k in targets}
        return token_labels.token_label_loss(cls_logits, aux_logits, dense or targets["class"], targets["lam"])


LOSSES: dict[str, type] = {cls.name: cls for cls in (SoftmaxXent, TokenLabel)}


def validate(config: ml_collections.ConfigDict) -> list[str]:
    """Errors of the ``loss`` section and of the augmentation fields the chosen loss needs or rejects."""
    if config.loss.name not in LOSSES:
        return [f"loss.name={config.loss.name!r} is not one of: {', '.join(sorted(LOSSES))}"]
    errors = LOSSES[config.loss.name].validate(config)
    if not 0 <= config.loss.label_smoothing < 1:
        errors.append(f"loss.label_smoothing={config.loss.label_smoothing} must be in [0, 1)")
    return errors


def make_loss(config: ml_collections.ConfigDict) -> SoftmaxXent | TokenLabel:
    """The loss ``config.loss.name`` names, with its settings from the config."""
    return LOSSES[config.loss.name].from_config(config)
