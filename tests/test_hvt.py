"""HVT: parity with the original PyTorch code, param counts, pooling, conversion, training step."""

from __future__ import annotations

import argparse
import pickle
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from parity import apply_with_intermediates, assert_parity, load_case, nchw_to_nhwc, with_scanned
from steps import images, sgd_step

import jvit
import jvit.convert
from jvit.convert import hvt as hvt_rules
from jvit.models.hvt import max_pool_tokens, pooled_length
from jvit.utils import abstract_variables, count_params

CASES = ["reduced_pool3", "reduced_cifar32", "reduced_k2_every", "reduced_nopool", "hvt_ti_1"]


def case_model(meta: dict) -> tuple[str, dict]:
    """Registered name + overrides reproducing the case's original constructor config."""
    if meta["official"]:
        return meta["variant"], {}
    args = meta["constructor"]["params_args"]
    kw = {
        k: args[k]
        for k in (
            "patch_size",
            "num_heads",
            "head_dim",
            "num_blocks",
            "pool_kernel_size",
            "pool_stride",
            "pool_block_width",
        )
    }
    patch = meta["constructor"]["post_build_patch"]
    if patch is not None:
        # The HVT-S-0 structure: the original factory cannot express "no pooling", so the case
        # removed block 0's pooling and stage pos-embed after building.
        assert patch == "blocks[0].downsample = None; del blocks[0].pos_embed", patch
        kw["pool_block_width"] = 0
    return "hvt_ti_1", kw


# Fixture intermediate names -> jvit's module paths (jvit.models' naming scheme).
FIXTURE_NAMES = {"patch_embed_out": "patch_embed/out", "final_norm_out": "tokens"}


def jvit_key(fixture_key: str) -> str:
    """Fixture intermediate name -> jvit's sown path (``block_03_out`` -> ``blocks_3/out``,
    ``block_00_prepool`` -> ``blocks_0/prepool``)."""
    if fixture_key in FIXTURE_NAMES:
        return FIXTURE_NAMES[fixture_key]
    return re.sub(r"^block_(\d+)_(out|prepool)$", lambda m: f"blocks_{int(m[1])}/{m[2]}", fixture_key)


# Cases that also run with scan_blocks (stacked layout, converted by the same call) and the block entries
# their params then hold: a pooling block and a scanned run per stage (runs of one block in reduced_pool3),
# and the whole stack of the unpooled HVT-S-0 structure.
SCANNED = {
    "reduced_pool3": ["blocks_0", "blocks_1-1", "blocks_2", "blocks_3-3", "blocks_4", "blocks_5-5"],
    "reduced_cifar32": ["blocks_0", "blocks_1-3"],
    "reduced_nopool": ["blocks"],
}


@pytest.mark.parametrize(
    "case,scan",
    with_scanned(CASES, SCANNED),
)
def test_parity(case, scan):
    meta, io, ckpt = load_case("hvt", case)
    name, kw = case_model(meta)
    kw["scan_blocks"] = scan
    variables = jvit.convert.load_torch_checkpoint(ckpt, name, img_size=meta["img_size"], **kw)
    model = jvit.create_model(name, num_classes=meta["num_classes"], img_size=meta["img_size"], **kw)
    if scan:
        assert sorted(k for k in variables["params"] if k.startswith("blocks")) == SCANNED[case]
    logits, inter = apply_with_intermediates(model, variables, nchw_to_nhwc(io["images"]), by_path=True, unrolled=scan)
    refs = {k: v for k, v in io.items() if k not in ("images", "logits")}
    # Every intermediate the original recorded is compared (none silently skipped), and jvit sows
    # exactly the same set: a pooling block that pools too much or too little shows up here.
    assert {jvit_key(k) for k in refs} == set(inter)
    pooled = [int(k[6:8]) for k in refs if k.endswith("_prepool")]
    assert sorted(pooled) == meta["pooled_after_blocks"]
    for key, ref in refs.items():
        assert_parity(key, inter[jvit_key(key)], ref)
    assert_parity("logits", logits, io["logits"])


def test_layer_norm_eps_is_1e_6():
    """Every LayerNorm has eps 1e-6. A wrong eps moves the fixture logits by only ~1.5e-5, inside
    the parity tolerance, so each of the model's own LayerNorm calls is also run on a low-variance
    input (var 1e-6) where eps 1e-6 and 1e-5 give clearly different outputs."""
    meta, io, ckpt = load_case("hvt", "reduced_pool3")
    name, kw = case_model(meta)
    variables = jvit.convert.load_torch_checkpoint(ckpt, name, img_size=meta["img_size"], **kw)
    model = jvit.create_model(name, num_classes=meta["num_classes"], img_size=meta["img_size"], **kw)
    z = 0.5 + 1e-3 * np.random.default_rng(0).standard_normal((1, 5, 64)).astype(np.float32)
    eps_seen = []

    def probe(next_fun, args, kwargs, context):
        if not (isinstance(context.module, nn.LayerNorm) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        # LayerNorm is per token: append the probe tokens to the real ones, split them off after.
        x = args[0]
        out = next_fun(jnp.concatenate([x, jnp.broadcast_to(z, (x.shape[0],) + z.shape[1:])], axis=1))
        eps_seen.append(context.module.epsilon)
        p = context.module.variables["params"]
        context.module.sow("intermediates", "probe", (out[:, x.shape[1] :], p["scale"], p["bias"]))
        return out[:, : x.shape[1]]

    def run(variables, images):
        with nn.intercept_methods(probe):
            return model.apply(variables, images, mutable=["intermediates"])[1]

    probes = jax.jit(run)(variables, nchw_to_nhwc(io["images"]))
    seen = [v[0] for path, v in traverse_util.flatten_dict(probes["intermediates"]).items() if path[-1] == "probe"]
    assert len(seen) == len(eps_seen) == 2 * kw["num_blocks"] + 1  # norm1, norm2 per block + the final norm
    assert set(eps_seen) == {1e-6}
    zd = z.astype(np.float64)
    mean, var = zd.mean(-1, keepdims=True), zd.var(-1, keepdims=True)
    for out, scale, bias in seen:
        expect = (zd - mean) / np.sqrt(var + 1e-6) * scale + bias
        wrong = (zd - mean) / np.sqrt(var + 1e-5) * scale + bias
        assert np.abs(expect - wrong).max() > 0.1  # the probe input really resolves eps
        for image_out in np.asarray(out):
            np.testing.assert_allclose(image_out, expect[0], atol=2e-4, rtol=0)


# Measured by instantiating the original factory (spec §1): (1000 classes, 100 classes).
PARAM_COUNTS = {
    "hvt_ti_1": (5_735_656, 5_561_956),
    "hvt_s_0": (22_049_896, 21_703_396),
    "hvt_s_1": (22_087_144, 21_740_644),
    "hvt_s_2": (22_105_576, 21_759_076),
    "hvt_s_3": (22_114_408, 21_767_908),
    "hvt_s_4": (22_118_632, 21_772_132),
    "scale_hvt_ti_4": (22_118_632, 21_772_132),
}

# The released key set (spec §4.1-4.2): width, and the pooling blocks with their pooled lengths.
RELEASED = {
    "hvt_ti_1": (192, {0: 97}),
    "hvt_s_0": (384, {}),
    "hvt_s_1": (384, {0: 97}),
    "hvt_s_2": (384, {0: 97, 6: 48}),
    "hvt_s_3": (384, {0: 97, 4: 48, 8: 23}),
    "hvt_s_4": (384, {0: 97, 3: 48, 6: 23, 9: 11}),
    "scale_hvt_ti_4": (384, {0: 97, 3: 48, 6: 23, 9: 11}),
}
KEY_COUNTS = {
    "hvt_ti_1": 152,
    "hvt_s_0": 151,
    "hvt_s_1": 152,
    "hvt_s_2": 153,
    "hvt_s_3": 154,
    "hvt_s_4": 155,
    "scale_hvt_ti_4": 155,
}


def test_registry_lists_the_family():
    assert jvit.list_models("hvt") == sorted(PARAM_COUNTS)
    cfg = jvit.get_pretrained_cfg("hvt_s_1")
    assert (cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.num_classes) == (224, 0.875, "bicubic", 1000)
    assert cfg.weights_keys == ("model",)
    # The alias is the same model and the same released file.
    assert jvit.create_model("scale_hvt_ti_4") == jvit.create_model("hvt_s_4")
    assert jvit.get_pretrained_cfg("scale_hvt_ti_4") == jvit.get_pretrained_cfg("hvt_s_4")


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_counts(name):
    imagenet, cifar = PARAM_COUNTS[name]
    assert count_params(abstract_variables(jvit.create_model(name))) == imagenet
    assert count_params(abstract_variables(jvit.create_model(name, num_classes=100))) == cifar


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_stage_token_counts(name):
    """The pooled lengths (and so the stage pos-embeds) match the released key set."""
    _, pools = RELEASED[name]
    params = abstract_variables(jvit.create_model(name))["params"]
    assert params["pos_embed"].shape[1] == 196
    got = {
        int(k[7:]): v["pos_embed"].shape[1] for k, v in params.items() if k.startswith("blocks_") and "pos_embed" in v
    }
    assert got == pools


def test_max_pool_is_1d_valid_over_the_raster_sequence():
    """Windows of k consecutive tokens starting every s tokens, no padding, tail dropped."""
    x = np.random.default_rng(0).standard_normal((2, 14, 5)).astype(np.float32)
    for k, s in ((3, 2), (2, 2), (3, 3), (4, 1)):
        n = pooled_length(14, k, s)
        expect = np.stack([x[:, i * s : i * s + k].max(axis=1) for i in range(n)], axis=1)
        np.testing.assert_array_equal(np.asarray(max_pool_tokens(jnp.asarray(x), k, s)), expect)
    assert pooled_length(196, 3, 2) == 97 and pooled_length(97, 3, 2) == 48


def test_pool_stride_other_than_2_is_honoured():
    """The original ignores ``pool_stride``; here it sets the stride and the stage pos-embed lengths."""
    params = abstract_variables(jvit.create_model("hvt_s_2", pool_stride=3))["params"]
    assert params["blocks_0"]["pos_embed"].shape == (1, 65, 384)  # (196 - 3) // 3 + 1
    assert params["blocks_6"]["pos_embed"].shape == (1, 21, 384)  # (65 - 3) // 3 + 1


def test_bad_config_and_input_are_named():
    with pytest.raises(ValueError, match="block 3 pools 1 tokens with kernel 3"):
        abstract_variables(jvit.create_model("hvt_s_4", img_size=32))
    with pytest.raises(ValueError, match="pool_stride must be >= 1"):
        abstract_variables(jvit.create_model("hvt_s_1", pool_stride=0))
    model = jvit.create_model("hvt_ti_1", num_classes=10, img_size=32, patch_size=4, head_dim=16)
    variables = abstract_variables(model)
    with pytest.raises(ValueError, match=r"built for \(32, 32\) inputs but got \(64, 64\)"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="NCHW"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 3, 32, 32)))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = jvit.create_model("hvt_s_2", num_classes=10, dtype=jnp.bfloat16)
    variables = abstract_variables(model)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(model.apply, variables, jnp.ones((2, 224, 224, 3))).dtype == jnp.float32


def test_no_head_returns_features():
    model = jvit.create_model("hvt_ti_1", num_classes=0, img_size=32, patch_size=4, head_dim=16)
    variables = abstract_variables(model)
    assert "head" not in variables["params"]
    assert jax.eval_shape(model.apply, variables, jnp.ones((2, 32, 32, 3))).shape == (2, 48)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_train_step_traces(name):
    """Every variant's train step traces end to end with consistent shapes (no compile: cheap)."""
    model = jvit.create_model(name, num_classes=10, drop_rate=0.1, drop_path_rate=0.1)
    variables = abstract_variables(model)
    loss, grads, new = jax.eval_shape(sgd_step(model, images(model)), variables, jax.random.key(0))
    assert loss.shape == ()
    assert jax.tree.map(lambda a: a.shape, grads) == jax.tree.map(lambda a: a.shape, variables["params"])
    assert jax.tree.structure(new) == jax.tree.structure(variables)


@pytest.fixture(scope="module")
def fresh_ti1():
    model = jvit.create_model("hvt_ti_1", num_classes=10, drop_path_rate=0.1)
    return model, jvit.init_variables(model, 0)


def test_jit_forward_and_train_step_smallest(fresh_ti1):
    """HVT-Ti-1 from fresh init: jitted forward, one jitted SGD step in train mode with drop path."""
    model, variables = fresh_ti1
    assert set(variables) == {"params"}  # no batch stats, no frozen tables
    x = images(model)
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    loss, grads, new = jax.jit(sgd_step(model, x))(variables, jax.random.key(2))
    assert np.isfinite(loss) and abs(float(loss) - np.log(10)) < 1.0  # fresh init: near-uniform logits
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # Both the global and the stage pos-embed learn; the stage one only sees the 97 pooled tokens.
    assert np.abs(grads["pos_embed"]).sum() > 0
    assert np.abs(grads["blocks_0"]["pos_embed"]).sum() > 0
    out = jax.jit(model.apply)(new, x)
    assert np.isfinite(out).all() and np.abs(out - logits).max() > 0


def test_fresh_init_follows_the_original(fresh_ti1):
    """trunc_normal(0.02) pos-embeds and Linear weights, zero Linear biases, LayerNorm (1, 0),
    PyTorch-default patch conv U(+-1/sqrt(3 P^2))."""
    params = fresh_ti1[1]["params"]
    for w in (params["pos_embed"], params["blocks_0"]["pos_embed"], params["blocks_5"]["mlp"]["fc1"]["kernel"]):
        assert abs(float(np.std(w)) - 0.02) < 0.002
    assert not np.any(params["head"]["bias"]) and not np.any(params["blocks_3"]["attn"]["qkv"]["bias"])
    np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
    k = np.asarray(params["patch_embed"]["proj"]["kernel"])
    bound = 1 / np.sqrt(3 * 16 * 16)
    assert k.shape == (16, 16, 3, 192) and np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def released_state_dict(name: str, num_classes: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """The key set and shapes of a released checkpoint, from the spec's naming pattern, random values."""
    c, pools = RELEASED[name]
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, 196, c),
        "patch_embed.proj.weight": (c, 3, 16, 16),
        "patch_embed.proj.bias": (c,),
    }
    for i in range(12):
        if i in pools:
            shapes[f"blocks.{i}.pos_embed"] = (1, pools[i], c)
        for leaf, shape in (
            ("norm1", (c,)),
            ("attn.qkv", (3 * c, c)),
            ("attn.proj", (c, c)),
            ("norm2", (c,)),
            ("mlp.fc1", (4 * c, c)),
            ("mlp.fc2", (c, 4 * c)),
        ):
            shapes[f"blocks.{i}.{leaf}.weight"] = shape
            shapes[f"blocks.{i}.{leaf}.bias"] = (shape[0],)
    shapes.update(
        {"norm.weight": (c,), "norm.bias": (c,), "head.weight": (num_classes, c), "head.bias": (num_classes,)}
    )
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_official_variants_convert_from_the_released_layout(name):
    sd = released_state_dict(name)
    assert len(sd) == KEY_COUNTS[name] and sum(v.size for v in sd.values()) == PARAM_COUNTS[name][0]
    variables, report = jvit.convert.convert_state_dict(sd, jvit.create_model(name), hvt_rules.RULES)
    assert report.converted == len(sd) and not report.skipped
    p = variables["params"]
    np.testing.assert_array_equal(p["blocks_0"]["attn"]["qkv"]["kernel"], sd["blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(
        p["patch_embed"]["proj"]["kernel"], sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    )
    for i in RELEASED[name][1]:
        np.testing.assert_array_equal(p[f"blocks_{i}"]["pos_embed"], sd[f"blocks.{i}.pos_embed"])
    np.testing.assert_array_equal(p["norm"]["scale"], sd["norm.weight"])


def test_conversion_is_strict_about_the_variant():
    """A checkpoint of another pooling layout does not load, and the error names the keys."""
    with pytest.raises(jvit.convert.ConversionError, match=r"blocks_6/pos_embed[\s\S]*blocks\.4\.pos_embed"):
        jvit.convert.convert_state_dict(released_state_dict("hvt_s_3"), jvit.create_model("hvt_s_2"), hvt_rules.RULES)
    with pytest.raises(jvit.convert.ConversionError, match=r"blocks\.0\.pos_embed"):
        jvit.convert.convert_state_dict(released_state_dict("hvt_s_1"), jvit.create_model("hvt_s_0"), hvt_rules.RULES)
    with pytest.raises(jvit.convert.ConversionError, match=r"shape mismatch[\s\S]*pos_embed \(1, 196, 192\)"):
        jvit.convert.convert_state_dict(released_state_dict("hvt_ti_1"), jvit.create_model("hvt_s_1"), hvt_rules.RULES)


class _Payload:
    """Stands for arbitrary code a malicious pickle could name."""


def test_released_file_with_training_state_loads_safely(tmp_path):
    """main.py's checkpoint layout: model + optimizer/lr_scheduler/scaler state, epoch and the
    ``argparse.Namespace`` of training args. It converts without unrestricted unpickling (plain
    ``weights_only`` loading refuses it), and the weights are the ones under ``'model'``."""
    meta, io, ckpt = load_case("hvt", "reduced_pool3")
    name, kw = case_model(meta)
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    params = [torch.nn.Parameter(t.clone()) for t in sd.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.025)
    sum((p**2).sum() for p in params).backward()
    optimizer.step()
    # timm's CosineLRScheduler.state_dict(): its attributes (300 epochs, warmup 5 from 1e-6).
    scheduler = {
        "param_group_field": "lr",
        "base_values": [1e-3] * len(params),
        "metric": None,
        "t_initial": 300,
        "t_mul": 1.0,
        "lr_min": 1e-5,
        "decay_rate": 1.0,
        "cycle_limit": 1,
        "warmup_t": 5,
        "warmup_lr_init": 1e-6,
        "warmup_prefix": False,
        "t_in_epochs": True,
        "noise_range_t": None,
        "warmup_steps": [(1e-3 - 1e-6) / 5] * len(params),
    }
    args = argparse.Namespace(
        model="hvt_model",
        batch_size=128,
        lr=5e-4,
        weight_decay=0.025,
        input_size=64,
        pool_block_width=2,
        data_set="IMNET",
        resume="",
        distillation_type="none",
        mixup=0.8,
        seed=0,
        device="cuda",
    )
    path = tmp_path / "hvt_released.pth"
    torch.save(
        {
            "model": sd,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler,
            "epoch": 299,
            "scaler": {
                "scale": 65536.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 17,
            },
            "args": args,
        },
        path,
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    variables = jvit.convert.load_torch_checkpoint(path, name, img_size=meta["img_size"], **kw)
    model = jvit.create_model(name, num_classes=meta["num_classes"], img_size=meta["img_size"], **kw)
    assert_parity("logits", jax.jit(model.apply)(variables, nchw_to_nhwc(io["images"])), io["logits"])

    torch.save({"model": sd, "args": _Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(jvit.convert.UnsafeCheckpointError, match="_Payload"):
        jvit.convert.load_torch_checkpoint(tmp_path / "unsafe.pth", name, img_size=meta["img_size"], **kw)
