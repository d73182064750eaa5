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
from test_data import write_folder

import jvit
import jvit.checkpoint
import jvit.convert
from jvit.errors import ConfigError
from jvit.train import config as config_lib
from jvit.train import finetune, loop, optim

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
    variables = jvit.convert.load_torch_checkpoint(
        str(HVT_CASE / "checkpoint.pth"), "hvt_ti_1", img_size=32, **HVT_ARCH
    )
    return jvit.checkpoint.save_variables(
        tmp_path_factory.mktemp("ft") / "hvt_reduced",
        variables,
        {"model": "hvt_ti_1", "num_classes": 100, "img_size": 32},
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    return write_folder(
        tmp_path_factory.mktemp("images"),
        photos,
        {"train": {"china": 16, "flower": 16}, "val": {"china": 4, "flower": 4}},
        size=40,
    )


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
        0,
        0,
        0,
        "",
    )
    with pytest.raises(ValueError, match="unknown fine-tune option"):
        finetune_config("hvt_ti_1,mock,epochs=3")


def test_finetune_converted_model_on_a_folder(tmp_path, converted, folder):
    c = finetune_config(
        f"hvt_ti_1,folder:{folder},init={converted},img=32,steps=12,batch=16,lr=1e-3,warmup=0.25", **HVT_ARCH
    )
    c.log_every_steps, c.input.num_threads = 1, 1
    result = loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert result["step"] == 12 and 0 <= result["eval/top1"] <= 1 and math.isfinite(result["train/loss"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["train/lr"] for r in logged if "train/lr" in r}
    assert sorted(lrs) == list(range(1, 13))
    for step, lr in lrs.items():  # logged after step `step`, which used the lr of update step - 1
        np.testing.assert_allclose(lr, timm_lr(step - 1, lr=1e-3, warmup=3, total=12), rtol=1e-5)
    assert loop.setup(c).num_classes == 2  # the converted 100-class head was replaced by the folder's 2
    # The trained model, exported like a converted release, rebuilds and predicts the folder's classes.
    exported = finetune.export(str(tmp_path / "run"), str(tmp_path / "exported"))
    from jvit import viz

    model, variables, name = viz.load(exported)
    assert name == "hvt_ti_1" and variables["params"]["head"]["kernel"].shape[-1] == 2
    logits = model.apply(variables, jnp.zeros((1, 32, 32, 3)))
    assert logits.shape == (1, 2) and np.isfinite(np.asarray(logits)).all()


def test_layer_decay_and_frozen_backbone_scale_the_updates():
    model = jvit.create_model(
        "stvit_small",
        num_classes=4,
        img_size=64,
        embed_dim=(8, 16, 16, 16),
        depths=(1, 2, 1, 1),
        num_heads=(1, 1, 1, 1),
        projection=32,
    )
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


def test_384_configs_carry_the_originals_fine_tunes():
    for name, batch, ema in (
        ("stvit_small_384", 512, 0.99996),
        ("stvit_large_384", 512, 0.99996),
        ("spvit_s_384", 256, 0.0),
        ("spvit_m_384", 128, 0.0),
        ("spvit_l_384", 512, 0.99992),
    ):
        c = config_lib.load_config_file(ROOT / "configs" / f"{name}.py")
        config_lib.validate(c)
        assert c.model.img_size == 384 and c.batch_size == batch and c.ema.decay == ema, name
        assert (c.optimizer.lr, c.optimizer.min_lr, c.optimizer.weight_decay) == (5e-6, 5e-6, 1e-8), name
        assert c.model.train_in_eval_mode == name.startswith("stvit"), name
        schedule = optim.lr_schedule(c, updates_per_epoch=10.0)
        late = float(schedule(10 * 20))  # past any warmup: the lr is constant
        np.testing.assert_allclose([late, float(schedule(10 * 29))], 5e-6, rtol=1e-6)
    assert float(
        optim.lr_schedule(config_lib.load_config_file(ROOT / "configs" / "stvit_small_384.py"), 10.0)(0)
    ) == pytest.approx(5e-6)  # STViT: no warmup
    assert config_lib.load_config_file(ROOT / "configs" / "spvit_l_384.py").grad_accum_steps == 4


def test_train_in_eval_mode_keeps_batch_stats_and_turns_drop_path_off():
    from jvit.train import losses, steps
    from jvit.train import state as state_lib

    c = finetune_config(
        "stvit_small,mock,batch=8",
        embed_dim=(8, 16),
        depths=(1, 1),
        num_heads=(1, 1),
        n_iter=(1, 1),
        stoken_size=(1, 1),
        layerscale=(False, False),
        projection=32,
        drop_path_rate=0.5,
    )
    c.model.img_size = 32
    model = state_lib.build_model(c, 4)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    batch = {
        "image": jax.random.randint(jax.random.key(1), (8, 32, 32, 3), 0, 255).astype(jnp.uint8),
        "label": jnp.arange(8) % 4,
    }
    out = {}
    for eval_mode in (False, True):
        c.model.train_in_eval_mode = eval_mode
        tx, _ = optim.make_optimizer(c, 1.0)
        state = state_lib.new_state(variables, tx, c)
        run = jax.jit(
            lambda s, seed: steps.train_step(  # noqa: E731
                s.replace(step=seed),
                batch,
                model=model,
                tx=tx,
                config=c,
                loss=losses.make_loss(c),
                mean=(0.5,) * 3,
                std=(0.5,) * 3,
                num_classes=4,
            )
        )
        (a, ma), (_, mb) = run(state, jnp.int32(0)), run(state, jnp.int32(1))
        out[eval_mode] = (a, float(ma["loss"]), float(mb["loss"]))
    stats0 = jax.tree.leaves(variables["batch_stats"])
    trained, _, _ = out[False]
    assert any(not np.allclose(x, y) for x, y in zip(stats0, jax.tree.leaves(trained.collections["batch_stats"])))
    frozen, loss_a, loss_b = out[True]
    assert all(np.array_equal(x, y) for x, y in zip(stats0, jax.tree.leaves(frozen.collections["batch_stats"])))
    assert loss_a == loss_b  # no drop path: the step's randomness does not reach the loss
    assert out[False][1] != out[False][2]
