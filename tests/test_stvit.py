"""STViT: parity with the original PyTorch code, STA semantics and gradients, param counts, converter,
training step."""

from __future__ import annotations

import argparse

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from parity import assert_parity, load_case, nchw_to_nhwc, with_scanned
from steps import sgd_step

import jvit
import jvit.convert
import jvit.convert.layout
from jvit.convert.core import ConversionError, convert_state_dict
from jvit.convert.torch_io import select_state_dict, to_numpy
from jvit.models import layers
from jvit.models.layers import DepthwiseConv2d, gelu
from jvit.models.stvit import NEIGHBOURS, SuperTokenAttention, band_mask, fold_rows, neighbour_rows
from jvit.utils import abstract_variables, count_params

CASES = ["red_small_224", "red_ls_pad", "red_iter_pad"]
CONSTRUCTOR_KEYS = (
    "embed_dim",
    "depths",
    "num_heads",
    "n_iter",
    "stoken_size",
    "projection",
    "mlp_ratio",
    "qkv_bias",
    "qk_scale",
    "layerscale",
    "init_values",
)
STA_NAMES = ("stokens_init", "affinity", "affinity_colsum", "stokens", "stokens_refined")


def case_kwargs(meta: dict) -> dict:
    """The case's original constructor kwargs as STViT overrides."""
    kw = meta["constructor"]["kwargs"]
    return {k: tuple(kw[k]) if isinstance(kw[k], list) else kw[k] for k in CONSTRUCTOR_KEYS}


def fixture_path(key: str, depths: tuple[int, ...]) -> tuple[str, ...]:
    """Where jvit sows the fixture array ``key`` (``stage1_block0_affinity`` -> layers_1/blocks_0/attn/affinity)."""
    if not key.startswith("stage"):
        return {"patch_embed": ("patch_embed", "out")}.get(key, (key,))
    stage, rest = key.split("_", 1)
    s = int(stage[len("stage") :])
    layer = f"layers_{s}"
    if rest == "blocks_out":  # the stage's last block
        return (layer, f"blocks_{depths[s] - 1}", "out")
    if rest == "downsampled":
        return (layer, "downsample", "out")
    name = rest[len("block0_") :]
    if name in STA_NAMES:
        return (layer, "blocks_0", "attn", name)
    sub = {"pos_embed": ("pos_embed", "out"), "norm1": ("norm1", "out"), "sta_out": ("attn", "out")}
    return (layer, "blocks_0", *sub.get(name, (name,)))


def as_fixture_layout(actual: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """jvit's NHWC maps (and the head's row-major ``[B, N, C]`` tokens) in the fixtures' NCHW layout."""
    if actual.ndim == 3 and ref.ndim == 4:
        actual = actual.reshape(ref.shape[0], *ref.shape[2:], ref.shape[1])
    return actual.transpose(0, 3, 1, 2) if actual.ndim == 4 else actual


def apply_with_paths(model, variables, x):
    """Eval logits and every sown intermediate by path; a scanned stage's stacked ``blocks/...`` entries
    are split per block (``blocks_<i>/...``), as the unrolled model sows them."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
    logits, state = fn(variables, x)
    sown = jvit.convert.layout.unstack_blocks(jax.tree.map(np.asarray, state["intermediates"]))
    inter = {path: np.asarray(v[0]) for path, v in traverse_util.flatten_dict(sown).items()}
    return np.asarray(logits), inter


# Cases that also run with scan_blocks (every stage one stacked ``blocks`` entry, converted by the same call):
# stacks of one and two blocks, with and without layer scale, super-token and global-MHSA stacks, several
# association iterations and padding.
SCANNED = ["red_ls_pad", "red_iter_pad"]


@pytest.mark.parametrize(
    "case,scan",
    with_scanned(CASES, SCANNED),
)
def test_parity(case, scan):
    """Logits and every fixture intermediate (incl. association maps and their column sums) match the
    original, unrolled and scanned. The model is built at the registry's default img_size (224): the
    non-square 200x168 and 232x184 inputs run through it unchanged, as in the original (no position tables)."""
    meta, io, ckpt = load_case("stvit", case)
    kw = {**case_kwargs(meta), "scan_blocks": scan}
    variables = jvit.convert.load_torch_checkpoint(ckpt, "stvit_small", **kw)
    model = jvit.create_model("stvit_small", num_classes=meta["num_classes"], **kw)
    if scan:
        for collection in ("params", "batch_stats"):
            for s in range(4):
                assert sorted(k for k in variables[collection][f"layers_{s}"] if k.startswith("blocks")) == ["blocks"]
                depths = {np.shape(a)[0] for a in jax.tree.leaves(variables[collection][f"layers_{s}"]["blocks"])}
                assert depths == {kw["depths"][s]}
    assert model.img_size == 224 and list(io["images"].shape[2:]) == meta["img_size"]
    logits, inter = apply_with_paths(model, variables, nchw_to_nhwc(io["images"]))
    checked = [k for k in io if k not in ("images", "logits")]
    assert any(k.endswith("_affinity") for k in checked) and any(k.endswith("_colsum") for k in checked)
    for key in checked:
        assert_parity(key, as_fixture_layout(inter[fixture_path(key, kw["depths"])], io[key]), io[key])
    assert_parity("logits", logits, io["logits"])


# ---------------------------------------------------------------------------------------------
# STA on its own
# ---------------------------------------------------------------------------------------------


def test_neighbour_rows_band_holds_the_3x3_neighbourhood_and_fold_is_its_adjoint():
    """Band column (dy, m) of cell (a, n) is super token (a + dy - 1, m - 1) (zero outside the grid); the
    mask keeps exactly the 9 NEIGHBOURS of each cell; fold_rows is the linear transpose of neighbour_rows."""
    t = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    u = np.asarray(neighbour_rows(jnp.asarray(t)))
    mask = band_mask(4).reshape(4, 3, 6)
    assert u.shape == (2, 3, 3, 6, 5) and mask.sum() == 4 * 9
    for a in range(3):
        for n in range(4):
            for dy in range(3):
                for m in range(6):
                    inside = 0 <= a + dy - 1 < 3 and 0 <= m - 1 < 4
                    expect = t[:, a + dy - 1, m - 1] if inside else np.zeros((2, 5), np.float32)
                    np.testing.assert_array_equal(u[:, a, dy, m], expect)
                    assert mask[n, dy, m] == ((dy - 1, m - n - 1) in NEIGHBOURS)
    r = jnp.asarray(np.random.default_rng(1).standard_normal(u.shape).astype(np.float32))
    (adjoint,) = jax.linear_transpose(neighbour_rows, jnp.asarray(t))(r)
    np.testing.assert_allclose(fold_rows(r), adjoint, atol=1e-6)


def test_depthwise_conv_and_gelu_match_torch():
    """The shifted-slice depthwise conv (CPE, ConvFFN) is torch's Conv2d(groups=C, padding=1), forward
    and gradients, and the erf-form GELU is torch's exact GELU."""
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 6)).astype(np.float32)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    dw = DepthwiseConv2d(3)
    variables = {
        "params": {"kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0), "bias": conv.bias.detach().numpy()}
    }
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, dw.init(jax.random.key(0), x))
    ref = conv(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(dw.apply(variables, x), ref, atol=1e-6)
    # The hand-written backward (input and kernel gradients), compiled as the trainer compiles it.
    gy = np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
    (conv(xt) * torch.from_numpy(gy.transpose(0, 3, 1, 2))).sum().backward()
    loss = lambda v, x: jnp.sum(dw.apply(v, x) * gy)  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=layers.barrier_compiler_options())
    dv, dx = grad(variables, x)
    np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(dv["params"]["kernel"], conv.weight.grad.numpy().transpose(2, 3, 1, 0), atol=1e-5)
    np.testing.assert_allclose(dv["params"]["bias"], conv.bias.grad.numpy(), atol=1e-5)
    z = np.linspace(-12, 12, 100_001, dtype=np.float32)
    np.testing.assert_allclose(gelu(z), torch.nn.functional.gelu(torch.from_numpy(z)).numpy(), atol=2e-6)


def cell_of(y: int, x: int, s: int) -> tuple[int, int]:
    return y // s, x // s


def test_association_has_no_gradient_super_tokens_and_mapping_back_do():
    """On a padded 3x5 grid with s=2 and two association iterations:

    * the association map A and its column sums Z are constants for autodiff (zero Jacobian);
    * the super tokens' Jacobian w.r.t. the pixels is exactly that of fold(A^T X)/Z with A, Z frozen,
      built here by explicit loops from the spec's definitions;
    * the mapping back is y = sum_k A[., k] S'[cell + offset_k], and the loss reaches both the
      refine MHSA parameters and the pixels.
    """
    s, (h, w, c) = 2, (3, 5, 4)
    sta = SuperTokenAttention(stoken_size=s, n_iter=2, num_heads=2)
    x = jax.random.normal(jax.random.key(0), (1, h, w, c))
    variables = sta.init(jax.random.key(1), x)

    def run(x, params=variables["params"]):
        out, state = sta.apply({"params": params}, x, mutable=["intermediates"])
        inter = {k[-1]: v[0] for k, v in traverse_util.flatten_dict(state["intermediates"]).items()}
        return out, inter

    out, inter = run(x)
    a, z = np.asarray(inter["affinity"])[0], np.asarray(inter["affinity_colsum"])[0, ..., 0]
    hp, wp, hh, ww = 4, 6, 2, 3
    assert a.shape == (hp, wp, 9) and z.shape == (hh, ww)

    for name in ("affinity", "affinity_colsum"):
        jac = jax.jit(jax.jacobian(lambda x: run(x)[1][name]))(x)
        assert not np.any(np.asarray(jac)), f"{name} carries a gradient"

    # Z: total association towards each in-grid super token, padded pixels included (they hold 1/9).
    np.testing.assert_allclose(a[h:], 1 / 9, atol=1e-7)
    z_ref = np.zeros((hh, ww))
    jac_ref = np.zeros((hh, ww, c, h, w, c))
    for y in range(hp):
        for xx in range(wp):
            for k, (dy, dx) in enumerate(NEIGHBOURS):
                ma, mb = cell_of(y, xx, s)[0] + dy, cell_of(y, xx, s)[1] + dx
                if 0 <= ma < hh and 0 <= mb < ww:
                    z_ref[ma, mb] += a[y, xx, k]
                    if y < h and xx < w:
                        jac_ref[ma, mb, :, y, xx, :] += a[y, xx, k] * np.eye(c)
    np.testing.assert_allclose(z, z_ref, rtol=1e-6)
    jac_ref /= z_ref[:, :, None, None, None, None]
    jac = np.asarray(jax.jit(jax.jacobian(lambda x: run(x)[1]["stokens"]))(x))[0, :, :, :, 0]
    np.testing.assert_allclose(jac, jac_ref, atol=1e-6)

    refined = np.asarray(inter["stokens_refined"])[0]
    out_ref = np.zeros((h, w, c), np.float32)
    for y in range(h):
        for xx in range(w):
            for k, (dy, dx) in enumerate(NEIGHBOURS):
                ma, mb = cell_of(y, xx, s)[0] + dy, cell_of(y, xx, s)[1] + dx
                if 0 <= ma < hh and 0 <= mb < ww:
                    out_ref[y, xx] += a[y, xx, k] * refined[ma, mb]
    np.testing.assert_allclose(out[0], out_ref, atol=1e-6)

    r = jax.random.normal(jax.random.key(2), out.shape)
    gx, gp = jax.jit(jax.grad(lambda x, p: (run(x, p)[0] * r).sum(), argnums=(0, 1)))(x, variables["params"])
    assert np.abs(gx).max() > 0
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(gp["stoken_refine"]))


def primitives_of(fn, *args) -> set[str]:
    found: set[str] = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_sta_is_static_slices_and_contractions():
    """Forward and backward of STA use no gathers/scatters, loops or convolutions: pads, reshapes,
    static slices and dense contractions that XLA fuses."""
    sta = SuperTokenAttention(stoken_size=4, n_iter=2, num_heads=2)
    x = jnp.ones((2, 13, 10, 8))
    variables = sta.init(jax.random.key(0), x)
    prims = primitives_of(jax.grad(lambda v, x: sta.apply(v, x).sum(), argnums=(0, 1)), variables, x)
    assert "dot_general" in prims and "pad" in prims
    forbidden = {
        "gather",
        "scatter",
        "scatter-add",
        "scatter_add",
        "while",
        "scan",
        "dynamic_slice",
        "dynamic_update_slice",
        "conv_general_dilated",
        "pure_callback",
        "cond",
    }
    assert not prims & forbidden, prims & forbidden


# ---------------------------------------------------------------------------------------------
# Variants, parameter counts
# ---------------------------------------------------------------------------------------------

# Spec section 1.1: (embed_dim, depths, num_heads, layerscale), measured totals including the constant
# 81-element Unfold/Fold kernels (two per block) and trainable counts, and the trainable breakdown
# (stem, stage 1 .. stage 4 each with the PatchMerging at its end, head).
SPEC = {
    "stvit_small": dict(
        dims=(64, 128, 320, 512),
        depths=(3, 5, 9, 3),
        layerscale=(False,) * 4,
        total=25_498_864,
        trainable=25_495_624,
        parts=(65_952, 233_664, 1_392_960, 12_716_736, 9_533_952, 1_552_360),
    ),
    "stvit_base": dict(
        dims=(96, 192, 384, 512),
        depths=(4, 6, 14, 6),
        layerscale=(False, False, True, True),
        total=51_696_148,
        trainable=51_691_288,
        parts=(147_312, 633_024, 3_391_488, 26_893_056, 19_074_048, 1_552_360),
    ),
    "stvit_large": dict(
        dims=(96, 192, 448, 640),
        depths=(4, 7, 19, 8),
        layerscale=(False, False, True, True),
        total=94_977_252,
        trainable=94_971_096,
        parts=(147_312, 633_024, 3_956_736, 48_896_192, 39_654_400, 1_683_432),
    ),
}


def test_registry_lists_both_resolutions():
    assert set(SPEC) <= set(jvit.list_models())
    for name in SPEC:
        cfgs = jvit.get_model_entry(name).pretrained_cfgs
        assert [(c.img_size, c.crop_pct, c.interpolation) for c in cfgs] == [
            (224, 0.875, "bicubic"),
            (384, 1.0, "bicubic"),
        ]
        assert all(c.weights_keys[0] == "model" for c in cfgs)
        assert jvit.create_model(name, img_size=384).img_size == 384


@pytest.mark.parametrize("name", sorted(SPEC))
def test_param_counts(name):
    spec = SPEC[name]
    params = abstract_variables(jvit.create_model(name))["params"]
    assert count_params(params) == spec["trainable"]
    assert spec["trainable"] + 2 * 81 * sum(spec["depths"]) == spec["total"]
    parts = (
        count_params(params["patch_embed"]),
        *(count_params(params[f"layers_{i}"]) for i in range(4)),
        count_params([params["proj"], params["norm"], params["head"]]),
    )
    assert parts == spec["parts"]


def test_bad_input_and_config_are_named():
    model = jvit.create_model("stvit_small", num_classes=3)
    init = lambda model, shape: jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))  # noqa: E731
    with pytest.raises(ValueError, match="NCHW"):
        init(model, (1, 3, 64, 64))
    with pytest.raises(ValueError, match="one entry per stage"):
        init(jvit.create_model("stvit_small", depths=(1, 1, 1)), (1, 64, 64, 3))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        init(jvit.create_model("stvit_small", num_heads=(1, 3, 5, 8)), (1, 64, 64, 3))
    # Any other size is fine: there are no position tables (the parity cases run 200x168 and 232x184
    # inputs through img_size=224 models; the train step below runs 100x76 through img_size=96).
    assert init(model, (1, 37, 61, 3))["params"]["head"]["kernel"].shape == (1024, 3)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,scan",
    [(n, False) for n in sorted(SPEC)] + [("stvit_small", True)],
    ids=[*sorted(SPEC), "stvit_small-scanned"],
)
def test_train_step_traces(name, scan):
    """Every variant's train step traces end to end at 224 (no compile: cheap); scanned, with remat inside
    the scan body and per-block drop-path rates as a scanned input."""
    model = jvit.create_model(
        name, num_classes=10, drop_path_rate=0.1, scan_blocks=scan, remat="dots" if scan else "none"
    )
    variables = abstract_variables(model)
    step = sgd_step(model, jnp.zeros((2, 224, 224, 3)))
    loss, grads, new = jax.eval_shape(step, variables, jax.random.key(0))
    assert loss.shape == () and count_params(grads) == count_params(variables["params"])
    assert jax.tree.structure(new) == jax.tree.structure(variables)


def test_jit_forward_and_train_step_stvit_small():
    """Fresh init, one jitted SGD step in train mode on a non-square, non-divisible input (padding in
    both STA stages): finite loss and grads, every parameter (incl. layer scale-free STA refine) gets
    a gradient, BN running stats move, eval forward is finite."""
    model = jvit.create_model("stvit_small", num_classes=10, img_size=96, drop_path_rate=0.1)
    variables = jvit.init_variables(model, 0)
    x = jax.random.normal(jax.random.key(1), (2, 100, 76, 3))
    loss, grads, new = jax.jit(sgd_step(model, x))(variables, jax.random.key(2))
    assert np.isfinite(loss)
    flat = traverse_util.flatten_dict(grads)
    assert all(np.isfinite(g).all() for g in flat.values())
    dead = ["/".join(k) for k, g in flat.items() if not np.abs(g).max() > 0]
    assert not dead, dead
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(new["batch_stats"]), jax.tree.leaves(variables["batch_stats"]))
    )
    assert np.isfinite(jax.jit(model.apply)(new, x)).all()


# Two stages of two blocks (a super-token stage with padding, a global-MHSA stage with layer scale): the
# smallest model with both kinds of stack (compile time grows with the number of stages).
TINY = dict(
    embed_dim=(16, 32),
    depths=(2, 2),
    num_heads=(2, 4),
    n_iter=(2, 1),
    stoken_size=(2, 1),
    projection=32,
    layerscale=(False, True),
)


def test_scanned_train_step_matches_unrolled():
    """Scanned stages (remat inside the scan body) train like the unrolled ones: the train step's loss,
    gradients and updated BN statistics (every block's, stacked) agree with the unrolled model's in the
    stacked layout. (Drop path off: its draws differ between the layouts; test_train_step_traces runs it.)"""
    x = jax.random.normal(jax.random.key(1), (2, 36, 28, 3))  # stage 0: a 9x7 grid, padded to 10x8
    unrolled = jvit.create_model("stvit_small", num_classes=10, img_size=32, **TINY)
    scanned = unrolled.clone(scan_blocks=True, remat="block")
    variables = jvit.init_variables(unrolled, 0)
    stacked = jvit.convert.layout.match_layout(jax.tree.map(np.asarray, variables), abstract_variables(scanned))
    assert jax.tree.structure(stacked) == jax.tree.structure(abstract_variables(scanned))
    loss_u, grads_u, new_u = jax.jit(sgd_step(unrolled, x))(variables, jax.random.key(2))
    loss_s, grads_s, new_s = jax.jit(sgd_step(scanned, x))(stacked, jax.random.key(2))
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    got = {"grads": grads_s, **new_s}
    reference = jvit.convert.layout.match_layout(jax.tree.map(np.asarray, {"grads": grads_u, **new_u}), got)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, reference)
    for s in range(2):
        before, after = (v["batch_stats"][f"layers_{s}"]["blocks"]["norm2"]["mean"] for v in (stacked, new_s))
        assert not np.isclose(before, after).all(axis=-1).any(), f"layers_{s}: a block's BN statistics did not move"


# ---------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------


def released_state_dict(dims, depths, layerscale, projection=1024, num_classes=1000, seed=0):
    """A state dict with the key set, order and shapes of spec section 4.1, filled with random values
    (BN counters int64, Unfold/Fold kernels the one-hot identity), as torch tensors."""
    rng = np.random.default_rng(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(key, *shape):
        sd[key] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    def bn(prefix, c):
        for leaf in ("weight", "bias", "running_mean"):
            put(f"{prefix}.{leaf}", c)
        sd[f"{prefix}.running_var"] = torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32))
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)

    c0 = dims[0]
    for i, (cin, cout) in enumerate(((3, c0 // 2), (c0 // 2, c0 // 2), (c0 // 2, c0), (c0, c0))):
        put(f"patch_embed.proj.{3 * i}.weight", cout, cin, 3, 3)
        put(f"patch_embed.proj.{3 * i}.bias", cout)
        bn(f"patch_embed.proj.{3 * i + 2}", cout)
    eye = torch.eye(9).reshape(9, 1, 3, 3)
    for i, (c, depth) in enumerate(zip(dims, depths)):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            if layerscale[i]:
                put(f"{p}.gamma_1", 1, c, 1, 1)
                put(f"{p}.gamma_2", 1, c, 1, 1)
            put(f"{p}.pos_embed.conv.weight", c, 1, 3, 3)
            put(f"{p}.pos_embed.conv.bias", c)
            put(f"{p}.norm1.norm.weight", c)
            put(f"{p}.norm1.norm.bias", c)
            sd[f"{p}.attn.unfold.weights"] = eye.clone()
            sd[f"{p}.attn.fold.weights"] = eye.clone()
            put(f"{p}.attn.stoken_refine.qkv.weight", 3 * c, c, 1, 1)
            put(f"{p}.attn.stoken_refine.qkv.bias", 3 * c)
            put(f"{p}.attn.stoken_refine.proj.weight", c, c, 1, 1)
            put(f"{p}.attn.stoken_refine.proj.bias", c)
            bn(f"{p}.norm2", c)
            put(f"{p}.mlp2.fc1.weight", 4 * c, c, 1, 1)
            put(f"{p}.mlp2.fc1.bias", 4 * c)
            put(f"{p}.mlp2.fc2.weight", c, 4 * c, 1, 1)
            put(f"{p}.mlp2.fc2.bias", c)
            put(f"{p}.mlp2.conv.conv.weight", 4 * c, 1, 3, 3)
            put(f"{p}.mlp2.conv.conv.bias", 4 * c)
        if i + 1 < len(dims):
            put(f"layers.{i}.downsample.proj.0.weight", dims[i + 1], c, 3, 3)
            put(f"layers.{i}.downsample.proj.0.bias", dims[i + 1])
            bn(f"layers.{i}.downsample.proj.1", dims[i + 1])
    put("proj.weight", projection, dims[-1], 1, 1)
    put("proj.bias", projection)
    bn("norm", projection)
    put("head.weight", num_classes, projection)
    put("head.bias", num_classes)
    return sd


def released_checkpoint(model_sd, ema_sd):
    """The dict ``main.py`` saves (spec section 4.3)."""
    return {
        "model": model_sd,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": [0, 1]}]},
        "lr_scheduler": {"t_initial": 300},
        "epoch": 299,
        "model_ema": ema_sd,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="stvit_small", drop_path=0.1, model_ema=True),
        "max_accuracy": 83.6,
    }


@pytest.mark.parametrize("name", sorted(SPEC))
def test_released_layout_converts_at_224_and_384(name):
    """A checkpoint in the released layout (keys synthesised from the spec's naming pattern) converts
    strictly for both official resolutions: every key used or knowingly skipped, qkv regrouped per
    head, layer scale and BN running stats loaded."""
    spec = SPEC[name]
    sd = released_state_dict(spec["dims"], spec["depths"], spec["layerscale"])
    if name == "stvit_small":
        assert len(sd) == 478
    torch_params = sum(
        v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert torch_params == spec["total"]
    state_dict, key = select_state_dict(released_checkpoint(sd, sd), jvit.get_pretrained_cfg(name).weights_keys)
    assert key == "model"
    state_dict = to_numpy(state_dict)
    rules = jvit.convert.rules_for(name)
    converted = {}
    for img_size in (224, 384):
        model = jvit.create_model(name, img_size=img_size)
        converted[img_size], report = convert_state_dict(state_dict, model, rules, model_name=name)
        assert report.per_collection["params"] == spec["trainable"]
        reasons = [r for _, r in report.skipped]
        assert len(reasons) == 2 * sum(spec["depths"]) + 4 + 3 + sum(spec["depths"]) + 1
        assert sum("Unfold/Fold" in r for r in reasons) == 2 * sum(spec["depths"])
    jax.tree.map(np.testing.assert_array_equal, converted[224], converted[384])

    v = converted[224]
    stage = 3
    c, heads = spec["dims"][stage], jvit.create_model(name).num_heads[stage]
    d = c // heads
    qkv = v["params"][f"layers_{stage}"]["blocks_1"]["attn"]["stoken_refine"]["qkv"]
    w = state_dict[f"layers.{stage}.blocks.1.attn.stoken_refine.qkv.weight"][:, :, 0, 0]
    b = state_dict[f"layers.{stage}.blocks.1.attn.stoken_refine.qkv.bias"]
    for head in range(heads):
        for part in range(3):  # torch rows: head * 3d + part * d + i; jvit columns: part * C + head * d + i
            rows = slice(head * 3 * d + part * d, head * 3 * d + (part + 1) * d)
            cols = slice(part * c + head * d, part * c + (head + 1) * d)
            np.testing.assert_array_equal(qkv["kernel"][:, cols], w[rows].T)
            np.testing.assert_array_equal(qkv["bias"][cols], b[rows])
    block = v["params"]["layers_2"]["blocks_0"]
    if spec["layerscale"][2]:
        np.testing.assert_array_equal(block["gamma_2"], state_dict["layers.2.blocks.0.gamma_2"].reshape(-1))
    else:
        assert "gamma_1" not in block
    np.testing.assert_array_equal(
        v["batch_stats"]["layers_2"]["blocks_0"]["norm2"]["var"], state_dict["layers.2.blocks.0.norm2.running_var"]
    )


def small_config_state_dict(seed):
    return released_state_dict(
        (8, 16, 16, 16), (1, 1, 1, 1), (False, False, True, True), projection=8, num_classes=5, seed=seed
    )


SMALL = dict(
    embed_dim=(8, 16, 16, 16),
    depths=(1, 1, 1, 1),
    num_heads=(1, 2, 2, 4),
    layerscale=(False, False, True, True),
    projection=8,
)


def test_released_file_reads_model_by_default_and_ema_on_request(tmp_path):
    """The released wrapper (with optimizer state and an argparse Namespace) loads without trust=True;
    'model' is what the original evaluates, 'model_ema' is selectable."""
    path = tmp_path / "stvit-small-224.pth"
    model_sd, ema_sd = small_config_state_dict(0), small_config_state_dict(1)
    torch.save(released_checkpoint(model_sd, ema_sd), path)
    for key, sd in (("model", model_sd), ("model_ema", ema_sd)):
        v = jvit.convert.load_torch_checkpoint(
            path, "stvit_small", weights_key=None if key == "model" else key, **SMALL
        )
        np.testing.assert_array_equal(v["params"]["head"]["kernel"], sd["head.weight"].numpy().T)
        assert v["params"]["head"]["kernel"].shape == (8, 5)


def test_converter_is_strict():
    sd = to_numpy(small_config_state_dict(0))
    model = jvit.create_model("stvit_small", num_classes=5, **SMALL)
    rules = jvit.convert.rules_for("stvit_small")
    missing = {k: v for k, v in sd.items() if not k.startswith("layers.1.blocks.0.mlp2.fc1.")}
    with pytest.raises(ConversionError, match=r"(?s)missing.*layers_1/blocks_0/mlp2/fc1/kernel"):
        convert_state_dict(missing, model, rules)
    with pytest.raises(ConversionError, match=r"(?s)unexpected.*layers.0.blocks.0.gamma_1"):
        convert_state_dict({**sd, "layers.0.blocks.0.gamma_1": np.ones((1, 8, 1, 1), np.float32)}, model, rules)
    wrong_heads = jvit.create_model("stvit_small", num_classes=5, **{**SMALL, "num_heads": (1, 2, 2, 3)})
    with pytest.raises(ConversionError, match="not divisible by 3 x 3 heads"):
        convert_state_dict(sd, wrong_heads, rules)
