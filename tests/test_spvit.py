"""SP-ViT: parity with the original PyTorch code (eval and train mode), token-labeling outputs,
param counts, the converter on released layouts, training steps."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from parity import apply_with_intermediates, assert_parity, load_case, nchw_to_nhwc, tolerance, with_scanned
from steps import cross_entropy, images, sgd_step

import jvit
import jvit.convert
from jvit.convert import ConversionError, convert_state_dict, rules_for
from jvit.convert.layout import unstack_blocks
from jvit.models.spvit import SpatialPriorAttention, TokenLabelOutput, mix_tokens, relative_offsets
from jvit.train import losses
from jvit.utils import abstract_variables, count_params

CASES = ["s_like_spsa", "s_like_spsa_hires", "l_like_order", "vit_naive_cls_first"]

# Fixture arrays that are not outputs of the eval forward (checked elsewhere or inputs).
NOT_EVAL_OUTPUTS = {
    "images",
    "rel_indices",
    "_spec_prior_check_max_abs_err",
    "pos_embed_source",
    "train_cls_logits",
    "train_aux_logits",
    "train_bbox",
    "train_np_seed",
    "train_logits",
}


def case_model(meta: dict) -> tuple[str, dict]:
    """Registered name + overrides reproducing the case's original constructor.

    Which blocks use SP-SA and where the class token enters come from the fixture's own record
    (``spsa_block_indices``, ``cls_inserted_before_block``), not from ``local_up_to_layer``.
    """
    k = meta["constructor"]["kwargs"]
    stem = {"4_2": ("conv", 64), "4_2_128": ("conv", 128), "naive": ("patchify", 64)}[k["p_emb"]]
    kw = dict(
        embed_dim=k["embed_dim"],
        depth=k["depth"],
        num_heads=k["num_heads"],
        mlp_ratio=k["mlp_ratio"],
        skip_lam=k["skip_lam"],
        spsa_blocks=tuple(meta["spsa_block_indices"]),
        cls_insert_block=meta["cls_inserted_before_block"],
        use_aux_head=k["return_dense"],
        stem=stem[0],
        stem_width=stem[1],
    )
    return ("spvit_l" if k["p_emb"] == "4_2_128" else "spvit_s"), kw


@functools.cache
def load(case: str, ckpt_case: str | None = None, scan: bool = False):
    """(meta, io, model, variables) of a case, the weights converted from ``ckpt_case``'s checkpoint;
    ``scan``: the model with ``scan_blocks`` (stacked layout, converted by the same call)."""
    meta, io, ckpt = load_case("spvit", case)
    name, kw = case_model(meta)
    kw["scan_blocks"] = scan
    if ckpt_case is not None:
        ckpt = load_case("spvit", ckpt_case)[2]
    variables = jvit.convert.load_torch_checkpoint(ckpt, name, img_size=meta["img_size"], **kw)
    model = jvit.create_model(name, num_classes=meta["num_classes"], img_size=meta["img_size"], **kw)
    return meta, io, model, variables


def fixture_name(path: str) -> str:
    """The fixture's name for a sown intermediate's module path (``blocks_3/out`` -> ``block_out_03``,
    ``blocks_0/attn/spsa_prior`` -> ``spsa_prior_00``, ``tokens`` -> ``features``; ``features``, the
    class token vector the fixtures do not hold, -> ``features_cls``)."""
    if m := re.fullmatch(r"blocks_(\d+)/(out|attn/attn_probs|attn/spsa_prior)", path):
        kind = {"out": "block_out", "attn/attn_probs": "attn_probs", "attn/spsa_prior": "spsa_prior"}[m[2]]
        return f"{kind}_{int(m[1]):02d}"
    return {"patch_embed/out": "patch_embed", "tokens": "features", "features": "features_cls"}.get(path, path)


def eval_with_intermediates(
    model, variables, images_nhwc, unrolled: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Eval logits and the sown intermediates under the fixtures' names (``attn_probs_XX`` ...);
    ``unrolled``: a scanned model's stacked intermediates are split per block first."""
    logits, inter = apply_with_intermediates(model, variables, images_nhwc, by_path=True, unrolled=unrolled)
    named = {fixture_name(path): value for path, value in inter.items()}
    named["patch_embed"] = named["patch_embed"].transpose(0, 3, 1, 2)  # the fixture's is NCHW
    return logits, named


@pytest.fixture(scope="module", params=CASES)
def case(request):
    return request.param, *load(request.param)


# Cases that also run with scan_blocks, and the block entries their params then hold: the SP-SA run
# then the class-token run, plain runs before and after the class token (one of a single block), and
# the class token first (every block alike: the whole stack).
SCANNED = {
    "s_like_spsa": ["blocks_0-1", "blocks_2-3"],
    "l_like_order": ["blocks_0-1", "blocks_2-2"],
    "vit_naive_cls_first": ["blocks"],
}


@pytest.mark.parametrize(
    "name,scan",
    with_scanned(CASES, SCANNED),
)
def test_parity(name, scan):
    """Eval logits and every intermediate the fixture holds: stem, each block, attention
    probabilities, SP-SA priors, final features, class and aux logits."""
    meta, io, model, variables = load(name, scan=scan)
    if scan:
        assert sorted(k for k in variables["params"] if k.startswith("blocks")) == SCANNED[name]
    logits, named = eval_with_intermediates(model, variables, nchw_to_nhwc(io["images"]), unrolled=scan)
    expected = set(io) - NOT_EVAL_OUTPUTS - {"logits"}
    assert expected <= set(named), f"not sown: {expected - set(named)}"
    if meta["spsa_block_indices"]:
        assert any(k.startswith("spsa_prior") for k in expected)
    for key in sorted(expected):
        assert_parity(f"{name}/{key}", named[key], io[key])
    assert_parity(f"{name}/logits", logits, io["logits"])


@functools.cache
def train_forward(case: str):
    """Train-mode outputs of a case on its images, with the fixture's MixToken box if it has one."""
    _, io, model, variables = load(case)
    box = io.get("train_bbox")
    fn = jax.jit(lambda v, x, box: model.apply(v, x, train=True, mix_box=box, mutable=["batch_stats"]))
    return fn(variables, nchw_to_nhwc(io["images"]), box)


def test_train_mode_matches_original(case):
    """Train mode: stem BN on batch statistics, MixToken with the fixture's box, aux logits
    un-mixed (models without aux head: plain class logits)."""
    name, meta, io, model, variables = case
    out, updates = train_forward(name)
    if "train_logits" in io:
        assert_parity(f"{name}/train_logits", out, io["train_logits"])
        return
    assert isinstance(out, TokenLabelOutput)
    assert_parity(f"{name}/train_cls_logits", out.cls_logits, io["train_cls_logits"])
    assert_parity(f"{name}/train_aux_logits", out.aux_logits, io["train_aux_logits"])
    assert set(updates["batch_stats"]["patch_embed"]) == {"bn1", "bn2", "bn3"}


def test_features_are_the_class_token_the_head_reads():
    """``features`` is the final-norm class token ``[B, C]``; ``head`` applied to it is ``cls_logits``."""
    _, io, model, variables = load("s_like_spsa")
    _, named = eval_with_intermediates(model, variables, nchw_to_nhwc(io["images"]))
    assert_parity("features_cls", named["features_cls"], io["features"][:, 0])
    head = variables["params"]["head"]
    assert_parity("head(features)", named["features_cls"] @ head["kernel"] + head["bias"], io["cls_logits"])


def test_relative_offsets_match_the_original():
    _, io, _ = load_case("spvit", "s_like_spsa")
    np.testing.assert_array_equal(relative_offsets(8), io["rel_indices"])


# ---------------------------------------------------------------------------------------------
# Token labeling
# ---------------------------------------------------------------------------------------------


def _soft_ce(logits: np.ndarray, target: np.ndarray) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(np.mean(np.sum(-target * logp, axis=-1)))


def token_label_loss(out: TokenLabelOutput, target: np.ndarray, box) -> float:
    """The original's TokenLabelCrossEntropy as the spec (§6.1) writes it, on the train outputs.

    target ``[B, K, 2 + L]`` (col 1 crop-level label, cols 2.. token labels) or ``[B, K]``
    (image-level). The class target is mixed with ``lam = 1 - box_area / L``; token targets not.
    """
    cls, aux = np.asarray(out.cls_logits, np.float64), np.asarray(out.aux_logits, np.float64)
    b, n, k = aux.shape
    if target.ndim == 2:
        t_cls, t_aux = target, np.repeat(target[:, None], n, axis=1)
    else:
        t_cls, t_aux = target[:, :, 1], target[:, :, 2:].transpose(0, 2, 1)
    lam = 1 - (box[2] - box[0]) * (box[3] - box[1]) / n
    if lam < 1:
        t_cls = lam * t_cls + (1 - lam) * t_cls[::-1]
    return _soft_ce(cls, t_cls) + _soft_ce(aux.reshape(-1, k), t_aux.reshape(-1, k))


def test_token_label_outputs_feed_the_original_loss():
    """The train-mode contract: (cls_logits [B, K], aux_logits [B, L, K] row-major, un-mixed) is
    what the original's token-labeling loss consumed; with the fixture's dense and image-level
    targets the loss equals the original's."""
    with np.load(load_case("spvit", "s_like_spsa")[2].parent / "token_label.npz") as f:
        tl = {k: f[k] for k in f.files}
    box = tl["train_bbox"]
    np.testing.assert_array_equal(box, load("s_like_spsa")[1]["train_bbox"])
    out, _ = train_forward("s_like_spsa")
    assert out.aux_logits.shape == (2, int(tl["label_size"]) ** 2, 10)
    assert_parity("cls_logits", out.cls_logits, tl["train_cls_logits"])
    assert_parity("aux_logits", out.aux_logits, tl["train_aux_logits"])
    np.testing.assert_allclose(token_label_loss(out, tl["target"], box), tl["loss"], rtol=1e-5)
    np.testing.assert_allclose(token_label_loss(out, tl["target_image_level"], box), tl["loss_image_level"], rtol=1e-5)
    # The trainer's loss with image-level targets and the fixture's MixToken box is the same formula.
    lam = 1 - (box[2] - box[0]) * (box[3] - box[1]) / out.aux_logits.shape[1]
    targets = {"class": jnp.asarray(tl["target_image_level"]), "lam": jnp.float32(lam)}
    per_example = losses.TokenLabel()(out, targets)
    assert per_example.shape == (2,)
    np.testing.assert_allclose(float(per_example.mean()), tl["loss_image_level"], rtol=1e-5)
    with pytest.raises(TypeError, match="token_label"):
        losses.SoftmaxXent()(out, targets)


def test_mix_tokens_region_and_inverse():
    """Rows box[0]:box[2], cols box[1]:box[3] come from the batch-reversed sample; the swap undoes itself."""
    x = jnp.arange(3 * 4 * 5 * 2, dtype=jnp.float32).reshape(3, 4, 5, 2)
    box = jnp.array([1, 2, 3, 5])
    y = np.asarray(mix_tokens(x, box))
    expect = np.asarray(x).copy()
    expect[:, 1:3, 2:5] = np.asarray(x)[::-1, 1:3, 2:5]
    np.testing.assert_array_equal(y, expect)
    np.testing.assert_array_equal(mix_tokens(y, box), x)
    np.testing.assert_array_equal(mix_tokens(x, jnp.array([2, 0, 2, 5])), x)  # empty box


# ---------------------------------------------------------------------------------------------
# Resolution change: pos_embed from a low-resolution checkpoint, priors on the larger grid
# ---------------------------------------------------------------------------------------------


def test_low_res_checkpoint_into_high_res_model():
    """The 128-px checkpoint converted for a 192-px model: pos_embed resized bit-identically to the
    original's fine-tune loader, every other weight as is, and the 192-px outputs of the original."""
    meta, io, model, variables = load("s_like_spsa_hires", ckpt_case="s_like_spsa")
    direct = load("s_like_spsa_hires")[3]  # the checkpoint the original's loader wrote
    flat, flat_direct = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(direct)
    assert flat.keys() == flat_direct.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], flat_direct[key], err_msg="/".join(key))
    src = load_case("spvit", "s_like_spsa")
    np.testing.assert_array_equal(io["pos_embed_source"], torch.load(src[2])["state_dict"]["pos_embed"].numpy())
    logits, named = eval_with_intermediates(model, variables, nchw_to_nhwc(io["images"]))
    assert named["spsa_prior_00"].shape == (4, 144, 144)
    assert_parity("spsa_prior_00", named["spsa_prior_00"], io["spsa_prior_00"])
    assert_parity("logits", logits, io["logits"])


def test_cls_first_pos_embed_resize_keeps_the_class_row():
    """With the class token first (L + 1 rows) the class row is kept and only the grid is resized."""
    meta, io, ckpt = load_case("spvit", "vit_naive_cls_first")
    name, kw = case_model(meta)
    small = jvit.convert.load_torch_checkpoint(ckpt, name, img_size=64, **kw)["params"]["pos_embed"]
    large = jvit.convert.load_torch_checkpoint(ckpt, name, img_size=96, **kw)["params"]["pos_embed"]
    assert small.shape == (1, 17, 64) and large.shape == (1, 37, 64)
    np.testing.assert_array_equal(large[:, 0], small[:, 0])
    assert not np.allclose(large[:, 1:17], small[:, 1:])


# ---------------------------------------------------------------------------------------------
# Converter: wrappers, block types, layouts, the released key sets
# ---------------------------------------------------------------------------------------------


def test_ema_weights_are_preferred_where_the_original_evaluated_them(tmp_path):
    meta, io, ckpt = load_case("spvit", "s_like_spsa")
    name, kw = case_model(meta)
    sd = torch.load(ckpt)["state_dict"]
    other = {k: v + 0.1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "state_dict": other, "state_dict_ema": sd}, path)
    model = jvit.create_model(name, num_classes=10, img_size=128, **kw)
    x = nchw_to_nhwc(io["images"])
    apply = jax.jit(model.apply)
    ema = jvit.convert.load_torch_checkpoint(path, name, img_size=128, **kw)
    assert_parity("logits", apply(ema, x), io["logits"])
    plain = jvit.convert.load_torch_checkpoint(path, name, img_size=128, weights_key="state_dict", **kw)
    assert np.abs(np.asarray(apply(plain, x)) - io["logits"]).max() > 10 * tolerance(io["logits"])
    # Which entry each official resolution evaluated (the S/M 384 fine-tunes ran without EMA).
    for n in ("spvit_s", "spvit_m", "spvit_l"):
        assert jvit.get_pretrained_cfg(n, 224).weights_keys[0] == "state_dict_ema"
    assert jvit.get_pretrained_cfg("spvit_s", 384).weights_keys[0] == "state_dict"
    assert jvit.get_pretrained_cfg("spvit_m", 384).weights_keys[0] == "state_dict"
    assert jvit.get_pretrained_cfg("spvit_l", 384).weights_keys[0] == "state_dict_ema"


def test_block_type_disagreement_is_named():
    meta, _, ckpt = load_case("spvit", "s_like_spsa")
    name, kw = case_model(meta)
    with pytest.raises(ConversionError, match=r"(?s)block 0: the checkpoint has SP-SA weights.*spsa_blocks=\(0, 1\)"):
        jvit.convert.load_torch_checkpoint(ckpt, name, img_size=128, **{**kw, "spsa_blocks": ()})
    with pytest.raises(ConversionError, match=r"block 1: the checkpoint has SP-SA weights"):
        jvit.convert.load_torch_checkpoint(ckpt, name, img_size=128, **{**kw, "spsa_blocks": (0,)})
    with pytest.raises(ConversionError, match=r"block 2: the checkpoint has plain attention"):
        jvit.convert.load_torch_checkpoint(
            ckpt, name, img_size=128, **{**kw, "spsa_blocks": (0, 1, 2), "cls_insert_block": 3}
        )


def test_pos_embed_of_another_class_token_placement_is_named():
    """A class-token-first table (L + 1 rows) cannot fill a late-class-token model (L rows)."""
    meta, _, ckpt = load_case("spvit", "vit_naive_cls_first")
    name, kw = case_model(meta)
    with pytest.raises(ConversionError, match="(?s)pos_embed has 17 rows.*cls_insert_block=1"):
        jvit.convert.load_torch_checkpoint(ckpt, name, img_size=64, **{**kw, "cls_insert_block": 1})


# Official variants as the spec (§1, §4.1) describes them: dim, depth, heads, stem width, the blocks
# its code builds as SP-SA, and the measured parameter counts at 224 / 384.
SPEC = {
    "spvit_s": dict(dim=384, depth=16, heads=6, stem=64, spsa=range(14), params=(26_234_468, 26_380_388)),
    "spvit_m": dict(dim=512, depth=20, heads=8, stem=64, spsa=range(10), params=(55_952_992, 56_147_552)),
    "spvit_l": dict(dim=768, depth=24, heads=12, stem=128, spsa=range(0), params=(150_205_520, 150_497_360)),
}
PAIRS = [(n, s) for n in SPEC for s in (224, 384)]


def released_state_dict(name: str, img_size: int, classes: int = 1000) -> dict[str, np.ndarray]:
    """The key set and shapes of a released checkpoint, written from the spec's naming pattern (§4.1).

    Values are read-only broadcast constants (no memory), so full-size variants stay cheap.
    """
    s = SPEC[name]
    c, f, h = s["dim"], s["stem"], s["heads"]
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, c), "pos_embed": (1, (img_size // 16) ** 2, c)}
    for i, (cin, k) in enumerate(((3, 7), (f, 3), (f, 3)), start=1):
        shapes[f"patch_embed.conv{i}.weight"] = (f, cin, k, k)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"patch_embed.bn{i}.{leaf}"] = (f,)
        shapes[f"patch_embed.bn{i}.num_batches_tracked"] = ()
    shapes.update({"patch_embed.proj.weight": (c, f, 8, 8), "patch_embed.proj.bias": (c,)})
    for i in range(s["depth"]):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,)})
        if i in s["spsa"]:
            shapes.update(
                {
                    p + "attn.w2": (c, 1),
                    p + "attn.b2": (h,),
                    p + "attn.v.weight": (c, c),
                    p + "attn.qk.weight": (2 * c, c),
                    p + "attn.w1.weight": (c, 2),
                    p + "attn.w1.bias": (c,),
                }
            )
        else:
            shapes[p + "attn.qkv.weight"] = (3 * c, c)
        shapes.update(
            {
                p + "attn.proj.weight": (c, c),
                p + "attn.proj.bias": (c,),
                p + "norm2.weight": (c,),
                p + "norm2.bias": (c,),
                p + "mlp.fc1.weight": (3 * c, c),
                p + "mlp.fc1.bias": (3 * c,),
                p + "mlp.fc2.weight": (c, 3 * c),
                p + "mlp.fc2.bias": (c,),
                p + "pos_block.proj.0.weight": (c, 1, 3, 3),
                p + "pos_block.proj.0.bias": (c,),
            }
        )
    shapes.update(
        {
            "norm.weight": (c,),
            "norm.bias": (c,),
            "head.weight": (classes, c),
            "head.bias": (classes,),
            "aux_head.weight": (classes, c),
            "aux_head.bias": (classes,),
        }
    )
    return {k: np.broadcast_to(np.float32(0.5) if v else np.int64(7), v) for k, v in shapes.items()}


@pytest.mark.parametrize("name,img_size", PAIRS, ids=[f"{n}_{s}" for n, s in PAIRS])
def test_official_variants_convert_from_the_released_layout(name, img_size):
    """Every official variant/resolution converts strictly from its released key set; the
    converted parameters are exactly the spec's measured count (plus the stem BN statistics)."""
    sd = released_state_dict(name, img_size)
    model = jvit.create_model(name, img_size=img_size)
    variables, report = convert_state_dict(sd, model, rules_for(name), model_name=name)
    assert count_params(variables["params"]) == SPEC[name]["params"][img_size == 384]
    assert count_params(variables["batch_stats"]) == 3 * 2 * SPEC[name]["stem"]
    assert [k for k, _ in report.skipped] == [f"patch_embed.bn{i}.num_batches_tracked" for i in (1, 2, 3)]


@pytest.mark.parametrize("name", list(SPEC))
def test_224_checkpoint_loads_into_the_384_model(name):
    """The fine-tune path: a 224 checkpoint (14x14 pos_embed) fills a 384 model (24x24)."""
    model = jvit.create_model(name, img_size=384)
    variables, _ = convert_state_dict(released_state_dict(name, 224), model, rules_for(name))
    pos = variables["params"]["pos_embed"]
    assert pos.shape == (1, 576, SPEC[name]["dim"])
    np.testing.assert_allclose(pos, 0.5, rtol=1e-6)  # bicubic weights sum to one: a constant stays


# ---------------------------------------------------------------------------------------------
# Registry, param counts, configuration errors
# ---------------------------------------------------------------------------------------------


def test_registry_and_pretrained_cfgs():
    assert {"spvit_s", "spvit_m", "spvit_l"} <= set(jvit.list_models("spvit"))
    for name, crop in (("spvit_s", 0.9), ("spvit_m", 1.0), ("spvit_l", 1.0)):
        cfgs = jvit.get_model_entry(name).pretrained_cfgs
        assert [c.img_size for c in cfgs] == [224, 384]
        assert all(c.crop_pct == crop and c.interpolation == "bicubic" for c in cfgs)
    s, l_ = jvit.create_model("spvit_s"), jvit.create_model("spvit_l")
    assert (s.spsa_blocks, s.cls_insert_block) == (tuple(range(14)), 14)
    assert (l_.spsa_blocks, l_.cls_insert_block) == ((), 22)


@pytest.mark.parametrize("name,img_size", PAIRS, ids=[f"{n}_{s}" for n, s in PAIRS])
def test_param_counts(name, img_size):
    v = abstract_variables(jvit.create_model(name, img_size=img_size))
    assert count_params(v["params"]) == SPEC[name]["params"][img_size == 384]
    assert v["params"]["pos_embed"].shape == (1, (img_size // 16) ** 2, SPEC[name]["dim"])


def test_configuration_errors_are_named():
    x = jnp.zeros((1, 64, 64, 3))

    def init(**kw):
        return jvit.create_model("spvit_s", img_size=64, depth=4, **kw).init(jax.random.key(0), x)

    with pytest.raises(ValueError, match=r"spsa_blocks \[2\] are not before cls_insert_block=2"):
        init(spsa_blocks=(0, 2), cls_insert_block=2)
    with pytest.raises(ValueError, match="never inserts the class token"):
        init(spsa_blocks=(), cls_insert_block=4)
    with pytest.raises(ValueError, match="divisible by 16"):
        jvit.create_model("spvit_s", img_size=200).init(jax.random.key(0), jnp.zeros((1, 200, 200, 3)))
    model = jvit.create_model("spvit_s", img_size=64, depth=2, spsa_blocks=(0,), cls_insert_block=1)
    with pytest.raises(ValueError, match="NCHW"):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="mix_box"):
        model.init(jax.random.key(0), x, train=False, mix_box=jnp.array([0, 0, 1, 1]))


# ---------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------


def token_label_step(model):
    """The shared SGD step with MixToken and a token-labeling style loss (the image label on the
    class output and on every token); returns (step, images)."""
    x = images(model)
    grid = model.img_size // 16

    def loss(out, labels):
        return cross_entropy(out.cls_logits, labels) + cross_entropy(out.aux_logits, labels[:, None])

    return sgd_step(model, x, loss, mix_box=jnp.array([0, 1, grid // 2, grid])), x


# The runs of alike blocks each official variant scans with scan_blocks: its SP-SA blocks (SP-ViT-L:
# the plain blocks before the class token), then the blocks after the class token.
SCANNED_RUNS = {
    "spvit_s": ["blocks_0-13", "blocks_14-15"],
    "spvit_m": ["blocks_0-9", "blocks_10-19"],
    "spvit_l": ["blocks_0-21", "blocks_22-23"],
}


@pytest.mark.parametrize(
    "name,scan", [(n, False) for n in SPEC] + [(n, True) for n in SPEC], ids=list(SPEC) + [f"{n}-scanned" for n in SPEC]
)
def test_train_step_traces(name, scan):
    """Every variant's train step traces end to end with consistent shapes (no compile: cheap), also
    with its runs of blocks scanned and remat inside the scan body (stacked layout).
    (384 differs only in the grid; its forward is traced by test_param_counts.)"""
    kw = dict(scan_blocks=True, remat="dots") if scan else {}
    model = jvit.create_model(name, num_classes=10, drop_path_rate=0.1, **kw)
    variables = abstract_variables(model)
    if scan:
        assert sorted(k for k in variables["params"] if k.startswith("blocks")) == SCANNED_RUNS[name]
    step, _ = token_label_step(model)
    loss, grads, new = jax.eval_shape(step, variables, jax.random.key(0))
    assert loss.shape == () and count_params(grads) == count_params(variables["params"])
    assert jax.tree.structure(new) == jax.tree.structure(variables)


# Unrolled, XLA compiles the 16 blocks' PosCNN shifted sums one by one (minutes); the parity cases cover
# the unrolled layout in the default run.
@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True], ids=["unrolled", "scanned"])
def test_jit_forward_and_train_step(scan):
    """spvit_s (full depth, 14 SP-SA blocks) at 64 px on fresh init: the prior starts at 1 (SP-SA
    = plain attention), one jitted SGD step gives finite loss and gradients reaching the prior,
    moves the stem BN statistics, and the eval forward stays finite. Scanned: the SP-SA run and the
    class-token run are each one ``nn.scan`` with remat inside its body (the blocks compile once per
    run, a fraction of the unrolled compile)."""
    kw = dict(scan_blocks=True, remat="dots") if scan else {}
    model = jvit.create_model("spvit_s", num_classes=10, img_size=64, drop_path_rate=0.1, **kw)
    variables = jvit.init_variables(model, 0)
    step, x = token_label_step(model)
    params = unstack_blocks(variables["params"])  # the unrolled layout (blocks_<i>) either way
    prior = SpatialPriorAttention(384, 6).apply({"params": params["blocks_0"]["attn"]}, 4, method="prior")
    np.testing.assert_array_equal(prior, np.ones((6, 16, 16)))
    loss, grads, new = jax.jit(step)(variables, jax.random.key(2))
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    attn = unstack_blocks(grads)["blocks_0"]["attn"]
    assert np.abs(attn["w2"]).sum() > 0 and np.abs(attn["b2"]).sum() > 0
    assert np.abs(grads["pos_embed"]).sum() > 0 and np.abs(grads["cls_token"]).sum() > 0
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(new["batch_stats"]), jax.tree.leaves(variables["batch_stats"]))
    )
    logits = jax.jit(model.apply)(new, x)
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
