"""DeiT and Swin: parity with timm 0.4.12, strict conversion of the release layout, and the SoT-head
variants built from converted backbones (parameter counts: tests/test_models.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_ref
import torch
from flax import traverse_util
from parity import assert_parity, load_case, nchw_to_nhwc
from steps import images, sgd_step

import jvit
import jvit.convert
from jvit.models.swin import relative_position_index, shifted_window_mask
from jvit.utils import abstract_variables, count_params

CASES = [
    ("deit", "deit_reduced"),
    ("deit", "deit_distilled_reduced"),
    ("swin", "swin_2stage_shift"),
    ("swin", "swin_3stage_w4"),
]


def case_model(family: str, kwargs: dict) -> tuple[str, dict]:
    """Registered name + overrides reproducing a timm constructor call."""
    kw = dict(kwargs)
    kw.pop("num_classes"), kw.pop("img_size")
    if family == "deit":
        name = "deit_tiny_distilled" if kw.pop("distilled", False) else "deit_tiny"
        return name, kw
    kw["depths"], kw["num_heads"] = tuple(kw["depths"]), tuple(kw["num_heads"])
    return "swin_tiny", kw


def run_with_intermediates(model, variables, x) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Eval logits and every sown intermediate keyed by its module path (``blocks_0/out``)."""
    logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, x)
    flat = traverse_util.flatten_dict(state["intermediates"], sep="/")
    return np.asarray(logits), {k: np.asarray(v[0]) for k, v in flat.items()}


def check_case(name, kw, meta_kwargs, io, ckpt):
    variables = jvit.convert.load_torch_checkpoint(ckpt, name, img_size=meta_kwargs["img_size"], **kw)
    model = jvit.create_model(name, num_classes=meta_kwargs["num_classes"], img_size=meta_kwargs["img_size"], **kw)
    logits, inter = run_with_intermediates(model, variables, nchw_to_nhwc(io["images"]))
    expected = [k for k in io if k not in ("images", "logits")]
    assert set(expected) <= set(inter), set(expected) - set(inter)
    errors = {k: assert_parity(k, inter[k], io[k]) for k in expected}
    errors["logits"] = assert_parity("logits", logits, io["logits"])
    return errors


@pytest.mark.parametrize("family,case", CASES, ids=[c for _, c in CASES])
def test_parity_reduced(family, case):
    meta, io, ckpt = load_case(family, case)
    name, kw = case_model(family, meta["kwargs"])
    errors = check_case(name, kw, meta["kwargs"], io, ckpt)
    # Far inside the 1e-4 bound: an independent float32 re-implementation, not a tuned one.
    assert errors["logits"] < 1e-5 * max(1.0, float(np.abs(io["logits"]).max())), errors


def test_parity_scanned_layout():
    """DeiT with ``scan_blocks=True``: the converter gives the stacked layout, the logits match the original
    and the stacked ``blocks/out`` holds every block's output in order."""
    meta, io, ckpt = load_case("deit", "deit_reduced")
    name, kw = case_model("deit", meta["kwargs"])
    variables = jvit.convert.load_torch_checkpoint(
        ckpt, name, img_size=meta["kwargs"]["img_size"], scan_blocks=True, **kw
    )
    model = jvit.create_model(
        name, num_classes=meta["kwargs"]["num_classes"], img_size=meta["kwargs"]["img_size"], scan_blocks=True, **kw
    )
    assert "blocks" in variables["params"] and "blocks_0" not in variables["params"]
    logits, inter = run_with_intermediates(model, variables, nchw_to_nhwc(io["images"]))
    assert_parity("logits", logits, io["logits"])
    block_outs = sorted((k for k in io if k.startswith("blocks_") and k.endswith("/out")), key=lambda k: int(k[7:-4]))
    assert block_outs and inter["blocks/out"].shape[0] == len(block_outs)
    for i, key in enumerate(block_outs):
        assert_parity(key, inter["blocks/out"][i], io[key])


FULL = [
    "deit_tiny",
    "deit_small",
    "deit_base",
    "deit_tiny_distilled",
    "deit_small_distilled",
    "deit_base_distilled",
    "swin_tiny",
    "swin_small",
    "swin_base",
]
TIMM_NAME = {
    n: (n.replace("_distilled", "") + ("_distilled" if "distilled" in n else "") + "_patch16_224")
    if n.startswith("deit")
    else f"{n}_patch4_window7_224"
    for n in FULL
}


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_parity_full_depth(name, tmp_path):
    """The registered variant against timm's own constructor of that name, randomised, at 224."""
    try:
        vit, swin = timm_ref.load_timm()
    except ImportError as e:
        pytest.fail(f"{e}; timm 0.4.12 is a test dependency: pip install --no-deps timm==0.4.12 (README)")
    family = "deit" if name.startswith("deit") else "swin"
    ref = getattr(vit if family == "deit" else swin, TIMM_NAME[name])(pretrained=False)
    timm_ref.randomise(ref, seed=7)
    ref.eval()
    x = timm_ref.test_images(224)
    io = {"images": x, **timm_ref.run(ref, family, x)}
    torch.save({"model": ref.state_dict()}, tmp_path / "release.pth")
    check_case(name, {}, dict(img_size=224, num_classes=1000), io, tmp_path / "release.pth")


def test_registry_entries():
    for name in FULL:
        cfg = jvit.get_pretrained_cfg(name)
        assert cfg.urls and cfg.urls[0].endswith(cfg.files[0]) and cfg.top1 is not None
        assert cfg.crop_pct == (0.875 if name.startswith("deit") else 0.9) and cfg.interpolation == "bicubic"
    assert jvit.get_pretrained_cfg("deit_small_sot").urls == jvit.get_pretrained_cfg("deit_small").urls


def test_derived_swin_buffers_equal_the_checkpoints():
    """The index and mask jvit derives equal the buffers timm stored in the case's checkpoint."""
    _, _, ckpt = load_case("swin", "swin_2stage_shift")
    sd = jvit.convert.load_checkpoint_file(ckpt)["model"]
    np.testing.assert_array_equal(
        sd["layers.0.blocks.0.attn.relative_position_index"].numpy(), relative_position_index(7)
    )
    np.testing.assert_array_equal(sd["layers.0.blocks.1.attn_mask"].numpy(), shifted_window_mask(14, 14, 7, 3))
    assert "layers.1.blocks.1.attn_mask" not in sd  # 7x7 map: one window, no shift


def test_conversion_is_strict(tmp_path):
    """A distilled file does not load into a plain variant; a wrong window size fails on the buffers."""
    meta, _, ckpt = load_case("deit", "deit_distilled_reduced")
    _, kw = case_model("deit", meta["kwargs"])
    with pytest.raises(jvit.convert.ConversionError, match="dist_token"):
        jvit.convert.load_torch_checkpoint(ckpt, "deit_tiny", img_size=32, **kw)
    meta, _, ckpt = load_case("swin", "swin_3stage_w4")
    _, kw = case_model("swin", meta["kwargs"])
    kw["window_size"] = 8
    with pytest.raises(jvit.convert.ConversionError, match="relative_position_index"):
        jvit.convert.load_torch_checkpoint(ckpt, "swin_tiny", img_size=64, **kw)


def test_distilled_train_mode_returns_both_heads():
    meta, io, ckpt = load_case("deit", "deit_distilled_reduced")
    name, kw = case_model("deit", meta["kwargs"])
    variables = jvit.convert.load_torch_checkpoint(ckpt, name, img_size=32, **kw)
    model = jvit.create_model(name, num_classes=10, img_size=32, **kw)
    x = nchw_to_nhwc(io["images"])
    cls, dist = model.apply(variables, x, train=True)
    assert not np.allclose(cls, dist)
    np.testing.assert_allclose((cls + dist) / 2, model.apply(variables, x), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# SoT heads on DeiT / Swin backbones
# ---------------------------------------------------------------------------------------------

# Their parameter counts are checked with every variant's in tests/test_models.py.
SOT_VARIANTS = jvit.list_models("deit_sot") + jvit.list_models("swin_sot")


SOT_BACKBONE_CASE = {"deit": "deit_reduced", "swin": "swin_2stage_shift"}


@pytest.mark.parametrize("name", SOT_VARIANTS)
def test_sot_variant_loads_converted_backbone_and_trains(name):
    """Each *_sot variant (reduced through keyword overrides) takes a DeiT/Swin release-layout file:
    the backbone strictly, DeiT's head as cls_fc, the second-order branch fresh; then trains."""
    family = name.split("_")[0]
    meta, io, ckpt = load_case(family, SOT_BACKBONE_CASE[family])
    _, kw = case_model(family, meta["kwargs"])
    img = meta["kwargs"]["img_size"]
    head = jvit.create_model(name).second_order
    kw["second_order"] = type(head)("mgcrp", (2, 4), dropout=head.dropout)  # a small MGCrP for the tiny backbone
    variables, report = jvit.convert.convert_checkpoint(ckpt, name, img_size=img, **kw)
    assert report.fresh and all("classifier/" in n for n, _ in report.fresh)
    assert "initialised" in str(report)
    raw = jvit.convert.load_checkpoint_file(ckpt)["model"]
    params = variables["params"]
    np.testing.assert_array_equal(params["norm"]["scale"], raw["norm.weight"].numpy())
    if family == "deit":
        np.testing.assert_array_equal(params["classifier"]["cls_fc"]["kernel"], raw["head.weight"].numpy().T)
        assert any(n.endswith("visual_fc/kernel") for n, _ in report.fresh)
    else:
        assert "head" not in params and any(k == "head.weight" for k, _ in report.skipped)
    model = jvit.create_model(name, num_classes=10, img_size=img, drop_path_rate=0.1, **kw)
    # The backbone's tokens equal the plain model's on the same weights (the head is all that changed).
    x = nchw_to_nhwc(io["images"])
    _, inter = run_with_intermediates(model, variables, x)
    assert_parity("tokens", inter["tokens"], io["tokens"])
    step = jax.jit(sgd_step(model, jnp.asarray(x)))
    losses = []
    for i in range(3):
        loss, grads, variables = step(variables, jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.abs(grads["classifier"]["pooling"]["wr"]["kernel"]).sum() > 0
    assert np.abs(grads["patch_embed"]["proj"]["kernel"]).sum() > 0  # the head's gradient reaches the backbone


def test_full_size_sot_variants_trace():
    """Every full-size *_sot variant's train step traces (no compile)."""
    for name in SOT_VARIANTS:
        model = jvit.create_model(name, num_classes=10)
        variables = abstract_variables(model)
        loss, grads, _ = jax.eval_shape(sgd_step(model, images(model)), variables, jax.random.key(0))
        assert loss.shape == () and count_params(grads) == count_params(variables["params"])


def test_finetune_configs_start_from_the_release_files():
    from pathlib import Path

    from jvit.train import config as config_lib

    for name in SOT_VARIANTS:
        c = config_lib.load_config_file(Path(__file__).resolve().parents[1] / "configs" / f"{name}.py", None)
        config_lib.validate(c)
        assert c.model.name == name and c.num_epochs == 30 and c.ema.decay == 0.0
        assert c.init_from == jvit.get_pretrained_cfg(name).files[0]
        assert jvit.get_pretrained_cfg(name).urls[0].endswith(c.init_from)
