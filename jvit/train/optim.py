"""Optimizer and learning-rate schedule from ``config.optimizer`` (optax).

The originals all use timm's recipe: AdamW with decoupled weight decay (Loshchilov & Hutter,
2019) on every parameter except a no-decay group, a linear warmup and a cosine decay
(``CosineLRScheduler``), optionally a cooldown at ``min_lr``. Only ``params`` are optimised; the
other collections (BatchNorm statistics, frozen tables) never reach the optimizer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jvit.convert import layout
from jvit.train import finetune

Schedule = Callable[[jax.Array], jax.Array]


def peak_lr(config: ml_collections.ConfigDict) -> float:
    """``optimizer.lr``, scaled by ``batch_size / lr_base_batch_size`` when that rule is configured
    (HVT, STViT: ``lr = 5e-4 * batch / 512``)."""
    o = config.optimizer
    return o.lr * config.batch_size / o.lr_base_batch_size if o.lr_base_batch_size else o.lr


def validate(config: ml_collections.ConfigDict) -> list[str]:
    """Errors of the ``optimizer`` section (each message names the field)."""
    o, errors = config.optimizer, []
    checks = (
        (o.name in ("adamw",), f"optimizer.name={o.name!r} is not one of: adamw"),
        (o.lr > 0, f"optimizer.lr={o.lr} must be positive"),
        (o.lr_base_batch_size >= 0, f"optimizer.lr_base_batch_size={o.lr_base_batch_size} must be >= 0"),
        (0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1={o.b1}, b2={o.b2} must be in [0, 1)"),
        (o.eps > 0, f"optimizer.eps={o.eps} must be positive"),
        (o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0"),
        (o.clip_grad_norm >= 0, f"optimizer.clip_grad_norm={o.clip_grad_norm} must be >= 0"),
        (o.warmup_epochs >= 0, f"optimizer.warmup_epochs={o.warmup_epochs} must be >= 0"),
        (o.warmup_lr >= 0 and o.min_lr >= 0, f"optimizer.warmup_lr={o.warmup_lr}, min_lr={o.min_lr} must be >= 0"),
    )
    errors += [message for ok, message in checks if not ok]
    errors += finetune.validate(config)
    for field in ("wd_exclude", "wd_include"):
        for pattern in o[field]:
            try:
                re.compile(pattern)
            except re.error as e:
                errors.append(f"optimizer.{field} entry {pattern!r} is not a regex: {e}")
    return errors


def lr_schedule(config: ml_collections.ConfigDict, updates_per_epoch: float) -> Schedule:
    """Learning rate as a function of the optimizer-update count, timm's ``CosineLRScheduler``::

        t < warmup:       warmup_lr + (lr - warmup_lr) * t / warmup
        t < num_epochs:   min_lr + (lr - min_lr) * (1 + cos(pi * t / num_epochs)) / 2
        afterwards:       min_lr                                           (cooldown)

    with ``t`` in epochs, composed from optax's linear and cosine schedules. ``optimizer.warmup_steps`` /
    ``optimizer.decay_steps`` (> 0) give the warmup / the cosine in optimizer updates instead of
    ``warmup_epochs`` / ``num_epochs`` (fine-tuning sets them from the run length, so ``num_train_steps``
    rescales the whole curve). The originals step it once per epoch (``lr_per_epoch=True`` floors ``t``);
    the default evaluates it at every update, which is smoother and the same curve otherwise. (timm's
    DeiT-style loops also lag one epoch behind, e.g. epochs 0 and 1 both at ``warmup_lr``; that
    off-by-one is not reproduced.)
    """
    o = config.optimizer
    lr = peak_lr(config)
    warmup = o.warmup_steps / updates_per_epoch if o.warmup_steps else o.warmup_epochs
    total = o.decay_steps / updates_per_epoch if o.decay_steps else config.num_epochs
    # timm's cosine runs over t from 0 (not from the end of the warmup), so it is shifted by it.
    cosine = optax.cosine_decay_schedule(lr, total, alpha=o.min_lr / lr)
    in_epochs = cosine
    if warmup > 0:
        # Written as timm writes it: optax.linear_schedule's ``(start - end) * frac + end`` in float32
        # starts at warmup_lr only to ~1e-5 relative.
        warm = lambda t: o.warmup_lr + (lr - o.warmup_lr) * t / warmup  # noqa: E731
        in_epochs = optax.join_schedules([warm, lambda t: cosine(t + warmup)], [warmup])

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32) / updates_per_epoch
        return in_epochs(jnp.floor(t) if o.lr_per_epoch else t)

    return schedule


def param_path(path: tuple[Any, ...]) -> str:
    """``'blocks_0/attn/qkv/kernel'`` from a pytree key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def weight_decay_mask(params: Any, config: ml_collections.ConfigDict) -> Any:
    """``True`` where weight decay applies: not 1-D (if ``wd_exclude_1d``) and no ``wd_exclude``
    regex matching the parameter's path (timm's ``add_weight_decay`` + ``no_weight_decay()``).

    A ``wd_include`` regex overrides the 1-D rule: it names parameters that jvit stores 1-D but the
    original stores N-D, so timm decayed them (STViT's layer scale is ``(1, C, 1, 1)`` in PyTorch).
    """
    o = config.optimizer
    exclude = [re.compile(p) for p in o.wd_exclude]
    include = [re.compile(p) for p in o.wd_include]

    def decays(path, x) -> bool:
        name = param_path(path)
        # A stacked block leaf (scan_blocks) has a leading block axis: its own rank is one less.
        rank = len(x.shape) - layout.in_stacked_blocks(name)
        if o.wd_exclude_1d and rank <= 1 and not any(p.search(name) for p in include):
            return False
        return not any(p.search(name) for p in exclude)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    config: ml_collections.ConfigDict, updates_per_epoch: float
) -> tuple[optax.GradientTransformation, Schedule]:
    """The optax transformation for ``params`` and its lr schedule (indexed by optimizer update).

    Gradient accumulation wraps everything in ``optax.MultiSteps``: the inner optimizer (and so the
    schedule) only advances every ``grad_accum_steps`` calls, on the mean of the accumulated grads.
    """
    o = config.optimizer
    schedule = lr_schedule(config, updates_per_epoch)
    tx = optax.adamw(
        schedule,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        mask=lambda params: weight_decay_mask(params, config),
    )
    if o.clip_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
    tx = finetune.scale_updates(tx, config)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx, schedule


def applied_update(config: ml_collections.ConfigDict, opt_state: Any) -> jax.Array:
    """Whether the last optimizer call changed the params (always, unless accumulating gradients)."""
    if config.grad_accum_steps > 1:
        return optax.MultiSteps(optax.identity(), config.grad_accum_steps).has_updated(opt_state)
    return jnp.asarray(True)
