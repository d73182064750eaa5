"""SoT / So-ViT: parity with the original PyTorch code, param counts, head maths, training step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from parity import apply_with_intermediates, assert_parity, load_case, nchw_to_nhwc, tolerance
from steps import images, sgd_step

import jvit
import jvit.convert
from jvit.models.layers import Block, conv2d, tokens_from_map
from jvit.models.sot import SVPN, HeadConfig, SecondOrderClassifier, SVPNConfig
from jvit.utils import abstract_variables, count_params

CASES = [
    ("sot", "reduced_densenet_mgcrp"),
    ("sot", "reduced_svpn_iter3_sv2_alpha06"),
    ("sot", "sot_tiny_224"),
    ("sovit", "reduced_resnet_crosscov"),
    ("sovit", "so_vit_7_224"),
]

OFFICIAL = {"SoT_Tiny": "sot_tiny", "So_vit_7": "sovit_7"}


def case_model(meta: dict) -> tuple[str, dict]:
    """Registered name + overrides reproducing the case's original constructor config."""
    if meta["official"]:
        return OFFICIAL[meta["variant"]], {}
    cfg = meta["effective_config"]
    vit, rep = cfg["ViTConfig"], cfg["representationConfig"]
    kw = dict(embed_dim=vit["embed_dim"], depth=vit["depth"], num_heads=vit["num_heads"], mlp_ratio=vit["mlp_ratio"])
    if meta["family"] == "sot":
        norm = rep["args"]["normalization"]
        svpn = SVPNConfig(norm["alpha"], norm["iterNum"], norm["svNum"])
        dropout = 0.5 if norm["regular"] else 0.0
        kw["head"] = HeadConfig("mgcrp", (rep["args"]["num_heads"], rep["args"]["wr_dim"]), svpn, dropout)
        return "sot_tiny", kw
    norm = rep["normalization"]["args"]
    svpn = SVPNConfig(norm["alpha"], norm["iterNum"], norm["svNum"])
    dropout = 0.5 if norm["regular"] else 0.0
    kw["head"] = HeadConfig("cross", tuple(rep["args"]["dimension_reduction"]), svpn, dropout)
    return "sovit_7", kw


# The original's intermediate names (fixtures) -> jvit's module paths (the scheme of jvit.models). The
# fixtures' "features" is the original's concat of the class token and the visual features, not compared.
FIXTURE_NAMES = {
    "tokens_embed": "patch_embed",
    "block0_out": "blocks_0/out",
    "final_norm_out": "tokens",
    "features_cls": "features",
    "logits_cls": "classifier/logits_cls",
    "features_visual": "classifier/features_visual",
    "logits_visual": "classifier/logits_visual",
    "cov": "classifier/pooling/cov",
    "svpn_out": "classifier/pooling/svpn_out",
    "svpn_sigma": "classifier/pooling/svpn/svpn_sigma",
    "dr_q": "classifier/pooling/dr_q",
    "dr_k": "classifier/pooling/dr_k",
}

# One case per family also runs with the blocks scanned (stacked layout, converted by the same call).
SCANNED = [("sot", "reduced_densenet_mgcrp"), ("sovit", "reduced_resnet_crosscov")]


@pytest.mark.parametrize(
    "family,case,scan",
    [(f, c, False) for f, c in CASES] + [(f, c, True) for f, c in SCANNED],
    ids=[c for _, c in CASES] + [f"{c}-scanned" for _, c in SCANNED],
)
def test_parity(family, case, scan):
    meta, io, ckpt = load_case(family, case)
    name, kw = case_model(meta)
    if scan:
        kw["scan_blocks"] = True
    variables = jvit.convert.load_torch_checkpoint(ckpt, name, **kw)
    model = jvit.create_model(name, num_classes=meta["num_classes"], img_size=meta["img_size"], **kw)
    logits, inter = apply_with_intermediates(model, variables, nchw_to_nhwc(io["images"]), by_path=True)
    if scan:
        assert "blocks_0" not in variables["params"] and inter["blocks/out"].shape[0] == model.depth
        inter["blocks_0/out"] = inter.pop("blocks/out")[0]
    # dr_q / dr_k are [B, d, N] in the original (channels first), [B, N, d] here.
    for key in ("dr_q", "dr_k"):
        if FIXTURE_NAMES[key] in inter:
            inter[FIXTURE_NAMES[key]] = inter[FIXTURE_NAMES[key]].transpose(0, 2, 1)
    checked = [k for k in io if FIXTURE_NAMES.get(k) in inter]
    assert {"tokens_embed", "block0_out", "final_norm_out", "cov", "svpn_out", "svpn_sigma"} <= set(checked)
    for key in checked:
        assert_parity(key, inter[FIXTURE_NAMES[key]], io[key])
    assert_parity("logits", logits, io["logits"])


def test_svpn_alone_matches_reference():
    """svPN fed the original's covariance and start vector reproduces its output to 1e-6."""
    _, io, ckpt = load_case("sot", "reduced_svpn_iter3_sv2_alpha06")
    sd = jvit.convert.load_checkpoint_file(ckpt)["state_dict_ema"]
    w = sd["classifier.representation.norm.weight"].numpy()
    out = SVPN(alpha=0.6, iter_num=3, sv_num=2).apply({"params": {"weight": w}}, io["cov"])
    np.testing.assert_allclose(out, io["svpn_out"], atol=1e-6, rtol=0)


def test_ema_weights_are_the_default_and_plain_ones_selectable():
    """The reduced cases store different weights in state_dict and state_dict_ema on purpose."""
    meta, io, ckpt = load_case("sot", "reduced_densenet_mgcrp")
    name, kw = case_model(meta)
    model = jvit.create_model(name, num_classes=10, **kw)
    x = nchw_to_nhwc(io["images"])
    ema = jvit.convert.load_torch_checkpoint(ckpt, name, **kw)
    plain = jvit.convert.load_torch_checkpoint(ckpt, name, weights_key="state_dict", **kw)
    raw = jvit.convert.load_checkpoint_file(ckpt)
    kernel = ("params", "classifier", "cls_fc", "kernel")
    for variables, key in ((ema, "state_dict_ema"), (plain, "state_dict")):
        got = variables[kernel[0]][kernel[1]][kernel[2]][kernel[3]]
        np.testing.assert_array_equal(got, raw[key]["classifier.cls_fc.weight"].numpy().T)
    assert_parity("logits", model.apply(ema, x), io["logits"])
    diff = np.abs(np.asarray(model.apply(plain, x)) - io["logits"]).max()
    assert diff > 10 * tolerance(io["logits"]), "plain weights should give other logits than the EMA ones"


# (total incl. the frozen pos_embed, trainable): measured by instantiating the original code (spec §1.2).
PARAM_COUNTS = {
    "sot_tiny": (8_030_830, 7_983_550),
    "sot_small": (27_086_504, 27_010_856),
    "sot_base": (76_878_982, 76_774_966),
    "sovit_7": (5_579_664, 5_529_232),
    "sovit_10": (7_158_672, 7_108_240),
    "sovit_14": (24_718_704, 24_643_056),
    "sovit_19": (43_887_696, 43_799_440),
}


def test_registry_lists_the_family():
    assert set(PARAM_COUNTS) <= set(jvit.list_models())
    cfg = jvit.get_pretrained_cfg("sovit_7")
    assert cfg.weights_keys[0] == "state_dict_ema" and cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"
    with pytest.raises(KeyError, match="sot_tiny"):
        jvit.create_model("sot_tiny_")


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_counts(name):
    v = abstract_variables(jvit.create_model(name))
    total, trainable = PARAM_COUNTS[name]
    assert count_params(v["params"]) == trainable
    assert count_params(v["params"]) + count_params(v["frozen"]) == total


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_train_step_traces(name):
    """Every variant's train step traces end to end with consistent shapes (no compile: cheap)."""
    model = jvit.create_model(name, num_classes=10, drop_path_rate=0.1)
    variables = abstract_variables(model)
    loss, grads, new = jax.eval_shape(sgd_step(model, images(model)), variables, jax.random.key(0))
    assert loss.shape == () and count_params(grads) == count_params(variables["params"])
    assert jax.tree.structure(new) == jax.tree.structure(variables)


@pytest.mark.parametrize("name", ["sot_small", "sovit_7"])
def test_scanned_train_step_traces(name):
    """The scanned block stack (with remat inside the scan body) traces in a train step, stacked layout."""
    model = jvit.create_model(name, num_classes=10, drop_path_rate=0.1, scan_blocks=True, remat="dots")
    variables = abstract_variables(model)
    assert variables["params"]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == model.depth
    loss, grads, new = jax.eval_shape(sgd_step(model, images(model)), variables, jax.random.key(0))
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])


JIT_DEFAULT = ["sot_tiny", "sovit_7"]  # one per token embedding; the others only widen/deepen them


@pytest.mark.parametrize(
    "name",
    [n if n in JIT_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in sorted(PARAM_COUNTS)],
)
def test_jit_forward_and_train_step(name):
    """Fresh init, one jitted SGD step in train mode: finite loss and grads, frozen table untouched."""
    model = jvit.create_model(name, num_classes=10, drop_path_rate=0.1)
    variables = jvit.init_variables(model, 0)
    x = images(model)
    loss, grads, new = jax.jit(sgd_step(model, x))(variables, jax.random.key(2))
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # The svPN start vector and the frozen table: one trains, the other is not a parameter at all.
    assert np.abs(grads["classifier"]["pooling"]["svpn"]["weight"]).sum() > 0
    assert "pos_embed" not in jax.tree_util.tree_flatten_with_path(grads)[1].__repr__()
    np.testing.assert_array_equal(new["frozen"]["pos_embed"], variables["frozen"]["pos_embed"])
    # BN running stats moved; eval output is finite with them.
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(new["batch_stats"]), jax.tree.leaves(variables["batch_stats"]))
    )
    assert np.isfinite(jax.jit(model.apply)(new, x)).all()


@pytest.fixture(scope="module")
def sovit7():
    model = jvit.create_model("sovit_7", num_classes=10)
    return model, jvit.init_variables(model)


def test_fresh_pos_embed_is_the_sinusoid_table(sovit7):
    _, v = sovit7
    table = np.asarray(v["frozen"]["pos_embed"])[0]
    pos, dim = 5, 256
    j = np.arange(dim)
    expect = np.where(
        j % 2 == 0, np.sin(pos / 10000 ** (2 * (j // 2) / dim)), np.cos(pos / 10000 ** (2 * (j // 2) / dim))
    )
    np.testing.assert_allclose(table[pos], expect, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The head on its own
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sv_num", [1, 2])
def test_svpn_converges_to_the_svd_power(sv_num):
    """With many power iterations svPN equals U diag(s^a) V^T on the top singular triplets plus the
    remainder scaled by s_k^(a-1) (numpy's SVD is the independent reference)."""
    alpha, eps = 0.5, 1e-5
    x = np.random.default_rng(0).standard_normal((3, 7, 5)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal(5).astype(np.float32)
    y = np.asarray(SVPN(alpha, iter_num=300, sv_num=sv_num).apply({"params": {"weight": w}}, x))
    u, s, vt = np.linalg.svd(x.astype(np.float64))
    for b in range(3):
        top = sum(s[b, i] ** alpha * np.outer(u[b, :, i], vt[b, i]) for i in range(sv_num))
        rest = x[b] - sum(s[b, i] * np.outer(u[b, :, i], vt[b, i]) for i in range(sv_num))
        expect = top + rest / (s[b, sv_num - 1] ** (1 - alpha) + eps)
        np.testing.assert_allclose(y[b], expect, atol=1e-4)


def test_head_has_no_svd_and_no_host_round_trip():
    """The head is plain batched linear algebra: no decomposition, callback or per-sample loop."""
    head = SecondOrderClassifier(10, HeadConfig("mgcrp", (6, 14), SVPNConfig(0.5, 3, 2)))
    x = jnp.ones((4, 197, 240))
    variables = head.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: head.apply(v, x))(variables, x).jaxpr
    primitives = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            primitives.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr)
    assert "dot_general" in primitives
    forbidden = {"svd", "eig", "eigh", "qr", "lu", "pure_callback", "io_callback", "callback", "while", "scan"}
    assert not primitives & forbidden, primitives & forbidden


class TinyViT(nn.Module):
    """A plain ViT without a class token (patchify conv + 2 blocks + LN) carrying the SoT head."""

    head: HeadConfig

    @nn.compact
    def __call__(self, x, train=False):
        x = tokens_from_map(conv2d(32, 8, in_features=3, stride=8, name="patch")(x))
        for i in range(2):
            x = Block(4, 2.0, name=f"block{i}")(x, train)
        x = nn.LayerNorm()(x)
        return SecondOrderClassifier(5, self.head, use_cls_token=False, name="head")(x, train)


@pytest.mark.parametrize("head", [HeadConfig("mgcrp", (3, 6)), HeadConfig("cross", (8, 5))], ids=["mgcrp", "cross"])
def test_second_order_head_on_a_plain_vit(head):
    model = TinyViT(head)
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (3, 5)
    assert "cls_fc" not in variables["params"]["head"]

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return (out**2).mean()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.abs(grads["patch"]["kernel"]).sum() > 0  # the head's gradient reaches the backbone


def test_bad_input_is_named(sovit7):
    model, variables = sovit7
    with pytest.raises(ValueError, match="NCHW"):
        model.apply(variables, jnp.zeros((1, 3, 224, 224)))
    with pytest.raises(ValueError, match=r"\(224, 224\)"):
        model.apply(variables, jnp.zeros((1, 192, 192, 3)))
    with pytest.raises(ValueError, match="img_size 224 or 112"):
        jvit.init_variables(jvit.create_model("sot_tiny", img_size=192))
