"""The training system: sharded steps, exact resume, NaN stop, init from converted weights, configs.

All runs use the 8 fake CPU devices of conftest.py, tiny HVT models and a handful of steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jvit
import jvit.checkpoint
import jvit.convert
import jvit.utils
from jvit.data import pipeline
from jvit.data.inference import normalize
from jvit.errors import ConfigError
from jvit.train import batch_augment, loop, losses, optim, sharding
from jvit.train import config as config_lib
from jvit.train import state as state_lib

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("compilation_cache")


def load_config(name: str, arg: str | None = None):
    """``configs/<name>.py``'s ``get_config(arg)``, as ``--config configs/<name>.py[:arg]`` loads it."""
    return config_lib.load_config_file(ROOT / "configs" / f"{name}.py", arg)


def tiny_config(**overrides):
    """A 2-block HVT (16 px, patch 4, width 16, a BatchNorm-free model) on mock data, batch 16."""
    c = config_lib.default_config()
    c.model.name = "hvt_ti_1"
    c.model.img_size = 16
    c.model.kwargs.update(patch_size=4, num_heads=2, head_dim=8, num_blocks=2, pool_block_width=1, drop_path_rate=0.1)
    c.input.dataset = "mock"
    c.input.mock_train_examples, c.input.mock_eval_examples, c.input.mock_num_classes = 48, 13, 5
    c.input.num_threads = 1
    c.batch_size = 16
    c.eval_batch_size = 8
    c.num_train_steps = 6
    c.optimizer.update(lr=1e-2, weight_decay=0.05, warmup_epochs=0.5, min_lr=1e-4)
    c.loss.label_smoothing = 0.1
    c.ema.decay = 0.9
    c.checkpoint.every_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config_lib.finalize(c)


def saved_state(workdir: Path, step: int) -> dict:
    """The raw arrays of checkpoint ``step``'s train state."""
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# --- config ---------------------------------------------------------------------------------


def test_config_names_unknown_fields_and_bad_values():
    c = tiny_config()
    with pytest.raises(AttributeError, match="optimzer"):
        c.optimzer = 1  # locked: typos cannot add fields
    c = config_lib.default_config()
    c.model.name = "hvt_ti_1"
    c.extra_field = 3
    c.optimizer.wd_extra = 1
    c.model.name = "hvt_tiny"
    c.batch_size = 0
    c.optimizer.name = "sgd"
    c.loss.name = "hinge"
    with pytest.raises(ValueError) as e:
        config_lib.validate(c)
    message = str(e.value)
    for needle in (
        "'extra_field'",
        "'optimizer.wd_extra'",
        "model.name='hvt_tiny'",
        "batch_size=0",
        "optimizer.name='sgd'",
        "loss.name='hinge'",
    ):
        assert needle in message


def test_every_shipped_config_loads_and_names_a_registered_model():
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
    assert {"default", "sot_base", "hvt_s_1"} <= set(names)
    for name in names:
        prefix = "hvt_ti_1," if name == "finetune" else ""  # finetune.py's argument names the model
        c = load_config(name, prefix + "mock" if prefix else None)
        config_lib.validate(c)
        assert c.model.name in jvit.list_models(), name
        assert load_config(name, prefix + "mock").input.dataset == "mock" or name == "default"


def test_recipe_configs_load_validate_and_carry_the_spec_recipe():
    for name in ("sot_tiny", "sot_small", "sot_base", "sovit_7", "sovit_10", "sovit_14", "sovit_19"):
        c = load_config(name)
        config_lib.validate(c)
        assert c.model.name == name and c.input.dataset == "imagenet2012"
        assert c.ema.decay == 0.99996 and c.loss.label_smoothing == 0.1
        assert c.optimizer.warmup_epochs == 5 and c.optimizer.min_lr == 1e-5 and c.cooldown_epochs == 10
    # sot.md section 10: SoT-B 512 / 5e-4 / 0.065, So-ViT-14 512 / 1e-3 / 0.05.
    b = load_config("sot_base")
    assert (b.batch_size, b.optimizer.lr, b.optimizer.weight_decay) == (512, 5e-4, 0.065)
    s = load_config("sovit_14")
    assert (s.batch_size, s.optimizer.lr, s.optimizer.weight_decay) == (512, 1e-3, 0.05)
    # The DeiT augmentation every ImageNet recipe uses (sot.md section 10, hvt.md section 6, stvit.md section 7).
    assert (b.input.train_preprocess, b.input.eval_preprocess) == ("augment", "center_crop")
    a = b.augment
    assert a.inception_crop and tuple(a.crop_scale) == (0.08, 1.0) and a.train_interpolation == "random"
    assert (a.hflip, a.rand_augment, a.random_erasing, a.color_jitter) == (0.5, "rand-m9-mstd0.5-inc1", 0.25, 0)
    assert (a.mixup_alpha, a.cutmix_alpha, a.mixup_prob, a.mixup_switch_prob, a.repeated_aug) == (0.8, 1.0, 1.0, 0.5, 0)
    # hvt.md section 6: 1024 images, lr 5e-4 per 512, wd 0.025 without pos_embeds, no EMA, RA x3, seed 0.
    for name in ("hvt_ti_1", "hvt_s_0", "hvt_s_1", "hvt_s_2", "hvt_s_3", "hvt_s_4"):
        h = load_config(name)
        assert h.model.name == name and (h.batch_size, h.optimizer.lr, h.optimizer.lr_base_batch_size) == (
            1024,
            5e-4,
            512,
        )
        assert h.optimizer.weight_decay == 0.025 and "pos_embed$" in h.optimizer.wd_exclude
        assert h.ema.decay == 0 and h.augment.repeated_aug == 3 and h.seed == 0 and h.cooldown_epochs == 0
    # spvit.md section 6: S/M 1024 at 1.6e-3, L 800 at 6e-4 (not rescaled), wd 0.05 without pos_embed and
    # cls_token, EMA 0.99992, no mixup but MixToken, token-labeling loss.
    for name, batch, lr, drop_path in (
        ("spvit_s", 1024, 1.6e-3, 0.1),
        ("spvit_m", 1024, 1.6e-3, 0.2),
        ("spvit_l", 800, 6e-4, 0.3),
    ):
        t = load_config(name)
        assert (t.batch_size, t.optimizer.lr, t.optimizer.lr_base_batch_size, t.model.kwargs.drop_path_rate) == (
            batch,
            lr,
            0,
            drop_path,
        )
        assert {"pos_embed$", "cls_token$"} <= set(t.optimizer.wd_exclude) and t.optimizer.weight_decay == 0.05
        assert t.ema.decay == 0.99992 and t.loss.name == "token_label" and t.cooldown_epochs == 10
        assert t.augment.mixup_alpha == 0 and t.augment.cutmix_alpha == 0 and t.augment.mix_token
    assert load_config("spvit_l").augment.rand_augment == "rand-n3-m9-mstd0.5-inc1"
    # stvit.md section 7: 1024 images, lr 5e-4 per 512, wd 0.05, drop path 0.1 / 0.4 / 0.6, EMA, RA x3, seed 0.
    for name, drop_path in (("stvit_small", 0.1), ("stvit_base", 0.4), ("stvit_large", 0.6)):
        t = load_config(name)
        assert t.model.name == name and (t.batch_size, t.optimizer.lr, t.optimizer.lr_base_batch_size) == (
            1024,
            5e-4,
            512,
        )
        assert t.optimizer.weight_decay == 0.05 and t.model.kwargs.drop_path_rate == drop_path
        assert t.ema.decay == 0.99996 and t.augment.repeated_aug == 3 and t.seed == 0 and t.cooldown_epochs == 0


def test_weight_decay_mask_and_schedule():
    c = load_config("sot_tiny")
    params = jvit.utils.abstract_variables(jvit.create_model("sot_tiny", img_size=112))["params"]
    mask = {optim.param_path(p): m for p, m in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params, c))}
    assert mask["cls_token"] and mask["blocks_0/attn/qkv/kernel"]  # timm decays the 3-D cls_token
    assert not mask["blocks_0/attn/proj/bias"] and not mask["norm/scale"]
    assert not mask["classifier/pooling/svpn/weight"]  # 1-D start vector
    # STViT's layer scales are (1, C, 1, 1) in PyTorch, so timm decays them; jvit stores them 1-D.
    t = load_config("stvit_base")
    params = jvit.utils.abstract_variables(jvit.create_model("stvit_base", img_size=64))["params"]
    mask = {optim.param_path(p): m for p, m in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params, t))}
    assert mask["layers_2/blocks_0/gamma_1"] and mask["layers_3/blocks_5/gamma_2"]
    assert not any(m for name, m in mask.items() if name.endswith(("bias", "scale")))
    assert sum(mask.values()) == sum(len(x.shape) > 1 for x in jax.tree.leaves(params)) + 2 * (14 + 6)
    # timm CosineLRScheduler per epoch: warmup from 1e-6, cosine to min_lr over 300 epochs, cooldown.
    schedule = optim.lr_schedule(c, updates_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(1e-6)
    assert float(schedule(25)) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 2 / 5)  # epoch 2 (floored)
    assert float(schedule(1500)) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 150 / 300)))
    assert float(schedule(3050)) == pytest.approx(1e-5)


# --- sharded steps --------------------------------------------------------------------------


def test_data_parallel_and_fsdp_steps_match_one_device():
    config = tiny_config(**{"mesh.fsdp_min_size": 0})
    exp = loop.setup(config)
    iterator = pipeline.train_iterator(exp.train_split.data, batch_size=16, preprocess=exp.train_preprocess, seed=0)
    batches = [next(iterator), next(iterator)]
    start = jax.device_get(loop.initial_state(exp))
    results = {}
    for name, mesh in {
        "one": sharding.make_mesh(devices=jax.devices()[:1]),
        "data": sharding.make_mesh(data=8),
        "fsdp": sharding.make_mesh(data=2, fsdp=4),
    }.items():
        run = dataclasses.replace(exp, mesh=mesh)
        shardings = run.state_shardings()
        state = jax.device_put(start, shardings)
        if name == "fsdp":
            specs = [s.spec for s in jax.tree.leaves(shardings.params)]
            assert any("fsdp" in spec for spec in specs), specs  # parameters really are split
        train_fn, _ = loop.compiled_steps(run)
        losses = []
        for b in batches:
            state, metrics = train_fn(state, sharding.global_batch(b, mesh))
            losses.append(float(metrics["loss"]))
        results[name] = (losses, jax.device_get(state))
    ref_losses, ref_state = results["one"]
    for name in ("data", "fsdp"):
        losses, st = results[name]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves((st.params, st.ema)), jax.tree.leaves((ref_state.params, ref_state.ema))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


# --- resume, NaN --------------------------------------------------------------------------------


class _Recorder:
    """Wraps the train iterator: records each batch's labels; raises after ``crash_after`` batches."""

    def __init__(self, iterator, log, crash_after=None):
        self.iterator, self.log, self.crash_after, self.count = iterator, log, crash_after, 0

    def __next__(self):
        if self.crash_after is not None and self.count == self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.count += 1
        batch = next(self.iterator)
        self.log.append(batch["label"].tolist())
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


_TRAIN_ITERATOR = pipeline.train_iterator


def _record(monkeypatch, log, crash_after=None):
    monkeypatch.setattr(
        pipeline, "train_iterator", lambda *a, **k: _Recorder(_TRAIN_ITERATOR(*a, **k), log, crash_after)
    )


def test_killed_run_resumes_bit_identical(tmp_path, monkeypatch):
    config = tiny_config()
    full_log, part_log = [], []
    _record(monkeypatch, full_log)
    full = loop.train_and_evaluate(config, str(tmp_path / "full"))

    _record(monkeypatch, part_log, crash_after=5)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, str(tmp_path / "part"))
    assert sorted(os.listdir(tmp_path / "part" / "checkpoints")) == ["2", "4"]
    resumed_log = []
    _record(monkeypatch, resumed_log)
    resumed = loop.train_and_evaluate(config, str(tmp_path / "part"))

    assert part_log[:4] + resumed_log == full_log  # the same batches in the same order
    assert resumed == full
    assert_trees_equal(saved_state(tmp_path / "part", 6), saved_state(tmp_path / "full", 6))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    loop.train_and_evaluate(tiny_config(num_train_steps=2), str(workdir))
    good = saved_state(workdir, 2)
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite .* step 3.*last checkpoint, step 2"):
        loop.train_and_evaluate(tiny_config(num_train_steps=6, **{"optimizer.lr": 1e30}), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    after = saved_state(workdir, 2)
    assert_trees_equal(after, good)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after["params"]))
    # ... and it resumes: the same workdir with a sane lr trains on from step 2 to the end.
    assert loop.train_and_evaluate(tiny_config(num_train_steps=4), str(workdir))["step"] == 4


# --- init from converted weights ------------------------------------------------------------


def test_init_from_converted_checkpoint_reinitialises_a_different_head(tmp_path):
    # A reduced HVT trained by the original code (100 CIFAR classes, 32 px) ...
    case = ROOT / "tests" / "fixtures" / "hvt" / "reduced_cifar32"
    arch = {
        "model.img_size": 32,
        "model.kwargs.num_heads": 3,
        "model.kwargs.head_dim": 16,
        "model.kwargs.num_blocks": 4,
        "model.kwargs.pool_block_width": 4,
    }
    pth = str(case / "checkpoint.pth")
    reference = jvit.convert.load_torch_checkpoint(
        pth,
        "hvt_ti_1",
        img_size=32,
        patch_size=4,
        **{k.split(".")[-1]: v for k, v in arch.items() if k.startswith("model.kwargs")},
    )
    # ... converted the way tools/convert_torch.py writes it, and read directly as a .pth.
    converted = str(tmp_path / "converted")
    jvit.checkpoint.save_variables(converted, reference, {"model": "hvt_ti_1", "num_classes": 100})
    for init_from in (converted, pth):
        config = tiny_config(init_from=init_from, **arch)  # mock data: 5 classes
        exp = loop.setup(config)
        state = loop.initial_state(exp)
        params = jax.device_get(state.params)
        flat = dict(jax.tree_util.tree_leaves_with_path(params))
        for path, value in jax.tree_util.tree_leaves_with_path(reference["params"]):
            if optim.param_path(path).startswith("head/"):
                assert flat[path].shape[-1] == 5 and value.shape[-1] == 100  # re-initialised for 5 classes
            else:
                np.testing.assert_array_equal(flat[path], value, err_msg=f"{init_from}: {jax.tree_util.keystr(path)}")
        assert_trees_equal(jax.device_get(state.ema["params"]), params)  # the EMA starts from the weights

    # Any other mismatch is an error naming the parameter.
    narrow = jvit.utils.abstract_variables(
        state_lib.build_model(tiny_config(**{**arch, "model.kwargs.head_dim": 8}), 5)
    )
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), narrow)
    with pytest.raises(ConfigError, match="pos_embed: checkpoint shape"):
        state_lib.merge_pretrained(fresh, reference, 5)


# --- the shipped configs --------------------------------------------------------------------


def test_default_config_end_to_end(tmp_path, capsys):
    config = load_config("default")
    config.num_train_steps = 30
    config.eval_every_steps = 0
    config.input.data_dir = str(tmp_path / "data")  # the digits are built here on first use
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("final:")]
    assert len(line) == 1 and line[0].startswith("final: step=30 ") and "eval/top1=" in line[0]
    assert result["eval/top1"] > 0.3  # well above chance (0.1) after 30 steps
    workdir = tmp_path / "run"
    assert (workdir / "config.json").is_file() and (workdir / "metrics.jsonl").is_file()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))


@pytest.mark.parametrize(
    "kwargs, num_params",
    [
        pytest.param(dict(embed_dim=48, depth=1, num_heads=2), None, id="reduced"),
        pytest.param({}, 76_774_966, id="full", marks=pytest.mark.slow),  # sot.md section 1.2: trainable
    ],
)
def test_sot_base_starts_training_on_mock_data(kwargs, num_params):
    """configs/sot_base.py:mock through the trainer's setup, init and jitted train step.

    One 224px image on one device: the model (plus AdamW moments and EMA) compiles and takes a step;
    the loop around it is what the tiny-model tests exercise. The default run narrows and shortens
    the backbone through ``model.kwargs`` (recipe, token embedding and MGCrP head as configured); the
    full 77M-parameter model compiles for minutes on a CPU, so it runs with ``-m slow``.
    """
    config = load_config("sot_base", "mock")
    config.model.kwargs.update(kwargs)
    config.batch_size = 8  # the smallest global batch 8 devices accept; one device runs 1 image below
    exp = loop.setup(config)
    assert (exp.num_classes, exp.img_size) == (1000, 224)
    exp = dataclasses.replace(exp, mesh=sharding.make_mesh(devices=jax.devices()[:1]), step_batch=1)
    state = loop.initial_state(exp)
    assert {k: getattr(exp.model, k) for k in kwargs} == kwargs  # the overrides reached the model
    assert num_params is None or jvit.count_params(state.params) == num_params
    train_fn, _ = loop.compiled_steps(exp)
    iterator = pipeline.train_iterator(
        exp.train_split.data, batch_size=1, preprocess=exp.train_preprocess, seed=config.seed
    )
    state, metrics = train_fn(state, sharding.global_batch(next(iterator), exp.mesh))
    assert int(state.step) == 1 and math.isfinite(float(metrics["loss"]))


def test_spvit_recipe_trains_with_the_token_label_loss(tmp_path):
    """configs/spvit_s.py:mock on a 2-block SP-ViT: the token-labeling loss takes the train-mode
    (cls, aux) outputs, eval scores the fused logits, and the loss goes down on a fixed batch."""
    config = load_config("spvit_s", "mock")
    config.model.img_size = 32
    config.model.kwargs.update(embed_dim=32, depth=2, num_heads=2, stem_width=8, spsa_blocks=(0,), cls_insert_block=1)
    config.input.update(mock_train_examples=8, mock_eval_examples=8, mock_num_classes=5, num_threads=1)
    config.update(batch_size=8, eval_batch_size=8, num_train_steps=6, eval_every_steps=0, log_every_steps=1)
    config.optimizer.update(lr=3e-3, warmup_epochs=0)
    config.checkpoint.every_steps = 6
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    losses = [
        r["train/loss"]
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in r
    ]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert 0 <= result["eval/top1"] <= 1 and math.isfinite(result["eval_ema/loss"])


def test_eval_mode_opens_no_train_split(tmp_path, monkeypatch):
    """``--mode=eval`` scores the workdir's latest checkpoint with the classes the run recorded; the
    training split is never opened (released weights can be scored with only the eval split on disk)."""
    workdir = str(tmp_path / "run")
    trained = loop.train_and_evaluate(tiny_config(num_train_steps=2), workdir)
    opened = []
    open_split = loop.sources.open_split
    monkeypatch.setattr(
        loop.sources,
        "open_split",
        lambda input_config, spec, **kw: opened.append((spec, kw["train"])) or open_split(input_config, spec, **kw),
    )
    evaluated = loop.evaluate_checkpoint(tiny_config(), workdir)
    assert opened == [("test", False)]
    assert evaluated == {k: v for k, v in trained.items() if k != "train/loss"}


def test_mixup_pairs_within_each_device_no_collective_permute():
    """The compiled train step on 8 devices with Mixup/CutMix: every device mixes its own rows, so the
    HLO holds no collective-permute (the global batch reversal compiles to one that moves every image:
    the control at the end shows the check would see it)."""
    config = tiny_config(**{"augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0})
    exp = loop.setup(config)
    state = loop.initial_state(exp)
    iterator = pipeline.train_iterator(exp.train_split.data, batch_size=16, preprocess=exp.train_preprocess, seed=0)
    batch = sharding.global_batch(next(iterator), exp.mesh)
    assert "collective-permute" not in loop.compiled_steps(exp)[0].lower(state, batch).compile().as_text()

    images = jax.device_put(np.zeros((16, 8, 8, 3), np.float32), sharding.batch_sharding(exp.mesh))
    targets = jax.device_put(np.zeros((16, 5), np.float32), sharding.batch_sharding(exp.mesh))
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
    key = jax.random.key(0)
    global_flip = jax.jit(lambda x, t: batch_augment.mixup_cutmix(key, x, t, **kwargs)[:2])
    per_shard = jax.jit(lambda x, t: batch_augment.mixup_cutmix_per_shard(key, x, t, shards=8, **kwargs)[:2])
    assert "collective-permute" in global_flip.lower(images, targets).compile().as_text()
    assert "collective-permute" not in per_shard.lower(images, targets).compile().as_text()


def test_cli_compiles_ahead_of_time_into_the_workdir_cache(tmp_path):
    """``python -m jvit.main`` says when it compiles the train step and how long it took, and keeps the
    compiled program in ``<workdir>/compilation_cache`` so that a restart reads it instead."""
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "jvit.main",
        f"--config={ROOT / 'configs' / 'default.py'}",
        f"--workdir={workdir}",
        "--config.num_train_steps=2",
        "--config.eval_every_steps=0",
        f"--config.input.data_dir={tmp_path / 'data'}",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiling the train step" in out.stderr and "compiled the train step in" in out.stderr
    assert any((workdir / "compilation_cache").iterdir())
    assert "final: step=2 " in out.stdout


def _tiny_stvit(depths=(1, 1), batch_norm="per_device"):
    """A 2-stage STViT (BatchNorm in the stem, blocks and head) on 32 px mock data, no drop path."""
    config = tiny_config(
        **{"model.name": "stvit_small", "model.img_size": 32, "model.batch_norm": batch_norm, "ema.decay": 0.0}
    )
    config.model.kwargs = ml_collections.ConfigDict(
        dict(
            embed_dim=(8, 16),
            depths=depths,
            num_heads=(1, 1),
            n_iter=(1, 1),
            stoken_size=(2, 1),
            layerscale=(False, False),
            projection=16,
        )
    )
    exp = loop.setup(config)
    iterator = pipeline.train_iterator(exp.train_split.data, batch_size=16, preprocess=exp.train_preprocess, seed=0)
    return exp, loop.initial_state(exp), sharding.global_batch(next(iterator), exp.mesh)


def test_batch_norm_statistics_are_per_device_by_default():
    """Per-device BatchNorm (the originals' DDP without SyncBN): the step's loss is the mean over the 8
    devices of the loss each device's 2 rows give alone, and the compiled step holds a single
    all-reduce (loss, gradients and statistics averaged together) however many BatchNorm layers the
    model has; ``model.batch_norm='global'`` (SyncBN) all-reduces inside every BatchNorm."""
    exp, state, batch = _tiny_stvit()
    variables = jax.device_get(state.variables())
    images = np.asarray(normalize(np.asarray(batch["image"]), exp.mean, exp.std))
    labels = np.asarray(batch["label"])
    per_shard = []
    for rows in np.split(np.arange(16), 8):
        logits, _ = exp.model.apply(variables, images[rows], train=True, mutable=["batch_stats"])
        per_shard.append(exp.loss(logits, {"class": losses.soft_targets(labels[rows], exp.num_classes, 0.1)}).mean())
    train_fn = loop.compiled_steps(exp)[0]
    hlo = train_fn.lower(state, batch).compile().as_text()
    _, metrics = train_fn(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(per_shard), rtol=1e-5)
    assert hlo.count(" all-reduce(") == 1

    deeper, deeper_state, deeper_batch = _tiny_stvit(depths=(2, 1))
    assert (
        loop.compiled_steps(deeper)[0].lower(deeper_state, deeper_batch).compile().as_text().count(" all-reduce(") == 1
    )
    synced, synced_state, synced_batch = _tiny_stvit(batch_norm="global")
    assert (
        loop.compiled_steps(synced)[0].lower(synced_state, synced_batch).compile().as_text().count(" all-reduce(") > 10
    )


def test_bfloat16_run_tracks_the_float32_loss_curve(tmp_path):
    """``model.dtype=bfloat16`` computes in bf16 with float32 parameters, optimizer state and loss; the
    loss curve of a short run stays on the float32 one."""
    curves = {}
    for dtype in ("float32", "bfloat16"):
        workdir = tmp_path / dtype
        loop.train_and_evaluate(tiny_config(num_train_steps=8, **{"model.dtype": dtype}), str(workdir))
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        curves[dtype] = np.array([r["train/loss"] for r in rows if "train/loss" in r])
        state = saved_state(workdir, 8)
        assert {x.dtype for x in jax.tree.leaves((state["params"], state["opt_state"]))} <= {
            np.dtype("float32"),
            np.dtype("int32"),
        }
    assert len(curves["float32"]) == 8
    np.testing.assert_allclose(curves["bfloat16"], curves["float32"], rtol=0.02)
    assert curves["bfloat16"][-1] < curves["bfloat16"][0]
