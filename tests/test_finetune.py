"""Fine-tuning (configs/finetune.py): a converted model trained on an image folder with a step-based
schedule that follows the run length, layer-wise lr decay, a frozen backbone, and 224 -> 384 starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jvit
import jvit.checkpoint
import jvit.convert
from jvit.errors import ConfigError
from jvit.train import config as config_lib
from jvit.train import finetune, loop, optim
from test_data import write_folder

ROOT = Path(__file__).resolve().parents[1]
# The reduced HVT the original code trained (tests/fixtures/hvt): 32 px, patch 4, 4 blocks, 100 classes.
HVT_CASE = ROOT / "tests" / "fixtures" / "hvt" / "reduced_cifar32"
HVT_ARCH = dict(patch_size=4, num_heads=3, head_dim=16, num_blocks=4, pool_block_width=4)


def finetune_config(arg: str, **kwargs):
    c = config_lib.load_config_file(ROOT / "configs" / "finetune.py", arg)
    c.model.kwargs.update(kwargs)
    return c


def timm_lr(t: float, *, lr: float, warmup: float, total: float, start: float = 1e-6, end: float = 1e-6) -> float:
    """timm CosineLRScheduler (t_in_epochs=False): linear warmup, then cosine over [0, total] (Loshchilov &
    Hutter, SGDR eq. 5), then ``end`` after ``total``; evaluated independently of jvit's implementation."""
    if t < warmup:
        return start + (lr - start) * t / warmup
    if t >= total:
        return end
    return end + 0.5 * (lr - end) * (1 + math.cos(math.pi * t / total))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    variables = jvit.convert.load_torch_checkpoint(str(HVT_CASE / "checkpoint.pth"), "hvt_ti_1", img_size=32,
                                                   **HVT_ARCH)
    return jvit.checkpoint.save_variables(tmp_path_factory.mktemp("ft") / "hvt_reduced", variables,
                                          {"model": "hvt_ti_1", "num_classes": 100, "img_size": 32})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from sklearn.datasets import load_sample_images
    from PIL import Image
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    return write_folder(tmp_path_factory.mktemp("images"), photos,
                        {"train": {"china": 16, "flower": 16}, "val": {"china": 4, "flower": 4}}, size=40)


def test_num_train_steps_rescales_warmup_and_cosine():
    c = finetune_config("hvt_ti_1,mock,steps=100,lr=1e-3,warmup=0.1")
    config_lib.validate(c)
    assert (c.optimizer.warmup_steps, c.optimizer.decay_steps) == (10, 100)
    c.num_train_steps = 400  # as --config.num_train_steps=400 does
    assert (c.optimizer.warmup_steps, c.optimizer.decay_steps) == (40, 400)
    c.grad_accum_steps = 2  # the schedule counts optimizer updates
    assert (c.optimizer.warmup_steps, c.optimizer.decay_steps) == (20, 200)
    schedule = optim.lr_schedule(c, updates_per_epoch=7.0)  # epochs play no part
    for t in (0, 5, 19, 20, 21, 100, 199, 200, 250):
        np.testing.assert_allclose(float(schedule(t)), timm_lr(t, lr=1e-3, warmup=20, total=200), rtol=1e-5)
    assert (c.augment.mixup_alpha, c.augment.cutmix_alpha, c.augment.repeated_aug, c.augment.rand_augment) == (
        0, 0, 0, "")
    with pytest.raises(ValueError, match="unknown fine-tune option"):
        finetune_config("hvt_ti_1,mock,epochs=3")


def test_finetune_converted_model_on_a_folder(tmp_path, converted, folder):
    c = finetune_config(f"hvt_ti_1,folder:{folder},init={converted},img=32,steps=12,batch=16,lr=1e-3,warmup=0.25",
                        **HVT_ARCH)
    c.log_every_steps, c.input.num_threads = 1, 1
    result = loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert result["step"] == 12 and 0 <= result["eval/top1"] <= 1 and math.isfinite(result["train/loss"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["train/lr"] for r in logged if "train/lr" in r}
    assert sorted(lrs) == list(range(1, 13))
    for step, lr in lrs.items():  # logged after step `step`, which used the lr of update step - 1
        np.testing.assert_allclose(lr, timm_lr(step - 1, lr=1e-3, warmup=3, total=12), rtol=1e-5)
    assert loop.setup(c).num_classes == 2  # the converted 100-class head was replaced by the folder's 2


def test_layer_decay_and_frozen_backbone_scale_the_updates():
    model = jvit.create_model("stvit_small", num_classes=4, img_size=64, embed_dim=(8, 16, 16, 16),
                              depths=(1, 2, 1, 1), num_heads=(1, 1, 1, 1), projection=32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
    ids, depth = finetune.layer_ids(params)
    flat = {optim.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(ids)}
    assert depth == 5
    assert flat["patch_embed/proj_0/kernel"] == 0
    assert {flat[k] for k in flat if k.startswith("layers_1/blocks_1/")} == {3}  # the third block overall
    assert {flat[k] for k in flat if k.startswith("layers_1/downsample/")} == {4}  # feeds block 4
    assert flat["head/kernel"] == 6

    c = finetune_config("stvit_small,mock,lr=0.1,layer_decay=0.5")
    c.optimizer.weight_decay, c.optimizer.warmup_steps, c.optimizer.clip_grad_norm = 0.0, 0, 0.0
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    tx, schedule = optim.make_optimizer(c, 1.0)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    step = {optim.param_path(p): float(u.ravel()[0]) for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    lr = float(schedule(0))
    for name, layer in flat.items():  # Adam's first step on grads of ones moves every param by lr (x scale)
        np.testing.assert_allclose(step[name], -lr * 0.5 ** (6 - layer), rtol=1e-5, err_msg=name)

    c = finetune_config("stvit_small,mock,frozen")
    assert c.model.train_in_eval_mode
    tx, _ = optim.make_optimizer(c, 1.0)
    updates, _ = tx.update(grads, tx.init(params), jax.tree.map(jnp.ones_like, params))
    moved = {optim.param_path(p) for p, u in jax.tree_util.tree_leaves_with_path(updates) if np.any(u != 0)}
    assert moved == {"head/kernel", "head/bias"}  # no update and so no weight decay elsewhere

    c = finetune_config("stvit_small,mock")
    c.optimizer.trainable = ("^heda/",)
    tx, _ = optim.make_optimizer(c, 1.0)
    with pytest.raises(ConfigError, match="matches no parameter"):
        tx.update(grads, tx.init(params), params)
