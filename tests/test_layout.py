"""Scanned block stacks (layers.BlockStack, model option scan_blocks) and the unrolled <-> stacked layout."""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import jvit
from jvit.convert.layout import match_layout, stack_blocks, unstack_blocks
from jvit.errors import ConfigError
from jvit.models.layers import Block, BlockStack
from jvit.models.sot import HeadConfig
from jvit.train import finetune, optim
from jvit.train import state as state_lib
from jvit.utils import abstract_variables


def _tree():
    """Two collections, a nested multi-stage stack and a sown tuple, like real variables."""
    rng = np.random.default_rng(0)
    block = lambda: {"attn": {"kernel": rng.normal(size=(4, 4))}, "norm": {"scale": rng.normal(size=(4,))}}  # noqa: E731
    return {
        "params": {"blocks_0": block(), "blocks_1": block(), "blocks_2": block(), "head": {"kernel": np.ones((4, 2))}},
        "batch_stats": {
            "layers_0": {"blocks_0": {"bn": {"mean": np.zeros(3)}}, "blocks_1": {"bn": {"mean": np.ones(3)}}}
        },
        "intermediates": {"blocks_0": {"out": (np.zeros((2, 4)),)}, "blocks_1": {"out": (np.ones((2, 4)),)}},
    }


def test_stack_and_unstack_are_inverse_on_every_collection():
    tree = _tree()
    stacked = stack_blocks(tree)
    assert set(stacked["params"]) == {"blocks", "head"}
    assert stacked["params"]["blocks"]["attn"]["kernel"].shape == (3, 4, 4)
    np.testing.assert_array_equal(
        stacked["params"]["blocks"]["norm"]["scale"][2], tree["params"]["blocks_2"]["norm"]["scale"]
    )
    assert stacked["batch_stats"]["layers_0"]["blocks"]["bn"]["mean"].shape == (2, 3)
    assert stacked["intermediates"]["blocks"]["out"][0].shape == (2, 2, 4)
    back = unstack_blocks(stacked)
    flat, flat_back = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(back)
    assert set(flat) == set(flat_back)
    for k in flat:
        np.testing.assert_array_equal(flat[k], flat_back[k])
    assert traverse_util.flatten_dict(match_layout(tree, stacked)).keys() == traverse_util.flatten_dict(stacked).keys()
    assert traverse_util.flatten_dict(match_layout(stacked, tree)).keys() == flat.keys()


def test_stacking_refuses_blocks_that_do_not_stack():
    tree = _tree()
    del tree["params"]["blocks_1"]
    with pytest.raises(ValueError, match=r"params/: blocks \[0, 2\] are not numbered without gaps"):
        stack_blocks(tree)
    tree = _tree()
    tree["params"]["blocks_2"]["attn"]["kernel"] = np.zeros((4, 5))
    with pytest.raises(ValueError, match="params/blocks_2 has other shapes than params/blocks_0"):
        stack_blocks(tree)
    tree = _tree()
    tree["params"]["blocks_1"]["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match="params/blocks_1 has other entries"):
        stack_blocks(tree)


def test_runs_of_blocks_stack_under_their_range_and_unstack_back():
    """A model that scans blocks 1..2 only (its block 0 differs) holds ``blocks_0`` and ``blocks_1-2``."""
    tree = _tree()
    reference = {"params": {"blocks_0": {}, "blocks_1-2": {}, "head": {}}}
    matched = match_layout(tree, reference)
    assert set(matched["params"]) == {"blocks_0", "blocks_1-2", "head"}
    np.testing.assert_array_equal(
        matched["params"]["blocks_1-2"]["attn"]["kernel"][1], tree["params"]["blocks_2"]["attn"]["kernel"]
    )
    back = unstack_blocks(matched)
    assert traverse_util.flatten_dict(back).keys() == traverse_util.flatten_dict(tree).keys()
    for k, v in traverse_util.flatten_dict(back["params"]).items():
        np.testing.assert_array_equal(v, traverse_util.flatten_dict(tree["params"])[k])
    # The same blocks from the whole-stack layout, and a run whose name does not fit its depth.
    assert set(match_layout(stack_blocks(tree), reference)["params"]) == {"blocks_0", "blocks_1-2", "head"}
    bad = {"params": {"blocks_0-5": stack_blocks(tree)["params"]["blocks"]}}
    with pytest.raises(ValueError, match="blocks_0-5: its leaves stack 3 blocks"):
        unstack_blocks(bad)


class _Stack(nn.Module):
    """Three small pre-LN blocks on ``[B, N, 16]`` tokens: the stack alone, cheap to compile."""

    scan: bool = False
    remat: str = "none"
    drop_path_rate: float = 0.0

    def setup(self):
        self.stack = BlockStack(
            block=Block,
            depth=3,
            block_kwargs=dict(num_heads=2, mlp_ratio=2.0),
            drop_path_rate=self.drop_path_rate,
            scan=self.scan,
            remat=self.remat,
        )

    def __call__(self, x, train=False):
        return self.stack(x, train)


def test_scanned_stack_computes_what_the_unrolled_one_does():
    """Same outputs, block outputs and gradients in the stacked layout; remat runs inside the scan."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    unrolled = _Stack()
    variables = jax.jit(unrolled.init)(jax.random.key(0), x)
    assert set(variables["params"]) == {"blocks_0", "blocks_1", "blocks_2"}
    stacked = stack_blocks(variables)

    def run(model, v):
        def loss(p):
            out, inter = model.apply({"params": p}, x, train=True, mutable=["intermediates"])
            return (out**2).mean(), (out, inter["intermediates"])

        return jax.jit(jax.grad(loss, has_aux=True))(v["params"])

    grads, (out, inter) = run(unrolled, variables)
    flat = traverse_util.flatten_dict(stack_blocks(grads))
    for remat in ("none", "dots"):
        scanned = _Stack(scan=True, remat=remat)
        fresh = jax.eval_shape(scanned.init, jax.random.key(0), x)
        assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, stacked)
        grads_s, (out_s, inter_s) = run(scanned, stacked)
        np.testing.assert_allclose(out_s, out, atol=1e-5)
        assert inter_s["blocks"]["out"][0].shape == (3, 2, 5, 16)
        np.testing.assert_allclose(inter_s["blocks"]["out"][0][1], inter["blocks_1"]["out"][0], atol=1e-5)
        flat_s = traverse_util.flatten_dict(grads_s)
        assert flat.keys() == flat_s.keys()
        for k in flat:
            np.testing.assert_allclose(flat_s[k], flat[k], atol=1e-6, rtol=1e-4, err_msg=f"{remat}: {'/'.join(k)}")


def test_scanned_drop_path_uses_the_per_block_rates():
    """Training with drop-path: block i drops its branches at rate i / (depth - 1) * drop_path_rate."""
    x = jax.random.normal(jax.random.key(1), (64, 5, 16))
    model = _Stack(scan=True, drop_path_rate=1.0)  # rates 0, 0.5, 1: block 2 always dropped
    variables = jax.jit(model.init)(jax.random.key(0), x)
    apply = jax.jit(lambda v, r: model.apply(v, x, True, rngs={"dropout": r}, mutable=["intermediates"]))
    _, inter = apply(variables, jax.random.key(3))
    out = inter["intermediates"]["blocks"]["out"][0]
    np.testing.assert_array_equal(out[2], out[1])  # rate 1: the residual branches vanish
    kept = ~np.isclose(out[1], out[0]).all(axis=(1, 2))
    assert 0 < kept.sum() < 64  # rate 0.5: some samples keep a branch, some do not


def _tiny(**kw):
    """Variables (random numbers, no compile) of a 3-block So-ViT."""
    model = jvit.create_model(
        "sovit_7",
        num_classes=5,
        img_size=112,
        embed_dim=16,
        depth=3,
        num_heads=2,
        head=HeadConfig(pooling="cross", dims=(4, 3)),
        **kw,
    )
    rng = np.random.default_rng(0)
    return model, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract_variables(model))


def test_the_model_option_gives_the_stacked_layout():
    _, variables = _tiny()
    _, scanned = _tiny(scan_blocks=True, remat="block")
    assert jax.tree.map(np.shape, scanned) == jax.tree.map(np.shape, stack_blocks(variables))


def test_init_from_an_unrolled_checkpoint_into_a_scanned_model():
    """merge_pretrained (config.init_from) stacks an unrolled checkpoint and stays strict."""
    _, variables = _tiny()
    fresh = jax.tree.map(np.zeros_like, stack_blocks(variables))
    merged, reinit = state_lib.merge_pretrained(fresh, variables, num_classes=5)
    assert not reinit
    np.testing.assert_array_equal(
        merged["params"]["blocks"]["mlp"]["fc1"]["kernel"][1], variables["params"]["blocks_1"]["mlp"]["fc1"]["kernel"]
    )
    shallow = {k: dict(v) for k, v in variables.items()}
    del shallow["params"]["blocks_2"]
    with pytest.raises(ConfigError, match=r"params/blocks/attn/qkv/kernel: checkpoint shape \(2, 16, 48\)"):
        state_lib.merge_pretrained(fresh, shallow, num_classes=5)
    # ... and the other way: a scanned run's (stacked) checkpoint into an unrolled model.
    merged, _ = state_lib.merge_pretrained(jax.tree.map(np.zeros_like, variables), stack_blocks(variables), 5)
    np.testing.assert_array_equal(
        merged["params"]["blocks_2"]["norm1"]["scale"], variables["params"]["blocks_2"]["norm1"]["scale"]
    )


def test_layer_decay_is_per_block_along_the_stacked_axis():
    _, variables = _tiny()
    ids, depth = finetune.layer_ids(variables["params"])
    ids_s, depth_s = finetune.layer_ids(stack_blocks(variables)["params"])
    assert depth == depth_s == 3
    np.testing.assert_array_equal(ids_s["blocks"]["attn"]["qkv"]["kernel"].ravel(), [1, 2, 3])
    assert ids_s["visual_tokens"]["stem"]["kernel"] == 0 and ids_s["norm"]["scale"] == ids["norm"]["scale"] == 4

    config = ml_collections.ConfigDict({"optimizer": {"layer_decay": 0.5, "trainable": ()}})
    scales = finetune.update_scales(stack_blocks(variables)["params"], config)
    np.testing.assert_allclose(scales["blocks"]["mlp"]["fc2"]["bias"].ravel(), [0.125, 0.25, 0.5])


def test_weight_decay_skips_the_same_parameters_in_both_layouts():
    _, variables = _tiny()
    config = ml_collections.ConfigDict({"optimizer": {"wd_exclude_1d": True, "wd_exclude": (), "wd_include": ()}})
    mask = optim.weight_decay_mask(variables["params"], config)
    mask_s = optim.weight_decay_mask(stack_blocks(variables)["params"], config)
    assert not mask_s["blocks"]["norm1"]["scale"] and not mask_s["blocks"]["attn"]["proj"]["bias"]
    assert mask_s["blocks"]["attn"]["qkv"]["kernel"]
    expect = {k: v for k, v in traverse_util.flatten_dict(mask).items() if k[0] != "blocks_1" and k[0] != "blocks_2"}
    got = {(("blocks_0",) + k[1:] if k[0] == "blocks" else k): v for k, v in traverse_util.flatten_dict(mask_s).items()}
    assert got == expect


def test_runs_of_a_segmented_model_keep_their_block_ids_and_decay():
    """HVT scans each stage's plain blocks as a run (``blocks_1-2``, ``blocks_4-5``) between unrolled pooling
    blocks: layer decay ids and the weight-decay mask are per block as in the unrolled layout."""
    kw = dict(num_classes=5, img_size=64, num_heads=1, head_dim=8, num_blocks=6, pool_block_width=3)
    unrolled = abstract_variables(jvit.create_model("hvt_ti_1", **kw))["params"]
    scanned = abstract_variables(jvit.create_model("hvt_ti_1", scan_blocks=True, **kw))["params"]
    assert sorted(k for k in scanned if k.startswith("blocks")) == ["blocks_0", "blocks_1-2", "blocks_3", "blocks_4-5"]
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), unrolled)
    assert jax.tree.map(np.shape, match_layout(zeros, scanned)) == jax.tree.map(np.shape, scanned)
    ids, depth = finetune.layer_ids(unrolled)
    ids_s, depth_s = finetune.layer_ids(scanned)
    assert depth == depth_s == 6
    np.testing.assert_array_equal(ids_s["blocks_4-5"]["mlp"]["fc1"]["kernel"].ravel(), [5, 6])
    assert ids_s["blocks_3"]["pos_embed"] == ids["blocks_3"]["pos_embed"] == 4 and ids_s["head"]["kernel"] == 7
    config = ml_collections.ConfigDict({"optimizer": {"wd_exclude_1d": True, "wd_exclude": (), "wd_include": ()}})
    mask_s = optim.weight_decay_mask(scanned, config)
    assert mask_s["blocks_1-2"]["attn"]["qkv"]["kernel"] and not mask_s["blocks_1-2"]["norm1"]["scale"]
