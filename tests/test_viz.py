"""jvit.viz on tiny models of the four families: PNGs written, and what they draw is well-formed."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

import jvit
import jvit.checkpoint
import jvit.convert.layout
import jvit.utils
from jvit import viz


def tiny(name, size, **kwargs):
    model = jvit.create_model(name, num_classes=7, img_size=size, **kwargs)
    return model, jvit.init_variables(model, 0)  # one jitted init: an eager model.init dispatches op by op


@pytest.fixture(scope="module")
def photo():
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[1])  # the flower


def assert_pngs(paths, names):
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == sorted(names)
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_stvit_association_rows_sum_to_one(tmp_path, photo):
    model, variables = tiny(
        "stvit_small",
        64,
        embed_dim=(8, 16, 16, 16),
        depths=(1, 2, 1, 1),
        num_heads=(1, 1, 1, 1),
        stoken_size=(4, 2, 1, 1),
        projection=16,
    )
    crop, x = viz.prepare_image(photo, "stvit_small", 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    _, inter = viz.intermediates(model, variables, x)
    affinities = viz.stvit_affinities(inter)
    assert sorted(affinities) == [0, 1]  # the two super-token stages (16x16 tokens in 4x4 cells, 8x8 in 2x2)
    for stage, aff in affinities.items():
        s, grid = model.stoken_size[stage], 16 >> stage
        assert aff.shape == (1, grid, grid, 9)
        np.testing.assert_allclose(aff.sum(-1), 1.0, rtol=1e-5)  # each pixel's 9 neighbours (eq. 4)
        dense = viz.association_matrix(aff[0], s)
        hh = grid // s
        assert dense.shape == (grid * grid, hh * hh) and (dense >= 0).all()
        rows = dense.sum(1).reshape(grid, grid)
        assert (rows <= 1 + 1e-5).all()
        assert hh == 4  # cells whose 3x3 neighbourhood lies inside the grid keep all their mass
        np.testing.assert_allclose(rows[s:-s, s:-s], 1.0, rtol=1e-5)
        assert rows[0, 0] < 1  # a corner pixel loses what it gave the zero super tokens outside the grid
    assert_pngs(
        viz.draw_stvit(model, crop, inter, str(tmp_path)),
        ["stvit_association_stage1.png", "stvit_association_stage2.png"],
    )


def test_spvit_prior_maps_have_the_grid_size(tmp_path, photo):
    model, variables = tiny("spvit_s", 64, depth=3, spsa_blocks=(0, 1), cls_insert_block=2, embed_dim=32, num_heads=2)
    crop, x = viz.prepare_image(photo, "spvit_s", 64)
    _, inter = viz.intermediates(model, variables, x)
    priors = viz.spvit_priors(inter)
    assert sorted(priors) == [0, 1]
    maps = viz.prior_maps(priors[0])
    assert maps.shape == (2, 4, 4) and np.isfinite(maps).all()
    # At initialisation w2 = 0 and b2 = 1: the prior is 1 everywhere (plain attention, SP-ViT section 3.2).
    np.testing.assert_array_equal(maps, 1.0)
    assert_pngs(viz.draw_spvit(model, crop, inter, str(tmp_path)), ["spvit_spatial_priors.png"])


def test_hvt_pooled_positions_follow_the_raster_pooling(tmp_path, photo):
    model, variables = tiny("hvt_ti_1", 64, patch_size=8, num_blocks=4, num_heads=2, head_dim=8, pool_block_width=2)
    crop, x = viz.prepare_image(photo, "hvt_ti_1", 64)
    _, inter = viz.intermediates(model, variables, x)
    stages = viz.pooled_positions(8, 8, viz.hvt_pools(model))
    assert [len(s) for s in stages] == [64, 31, 15]  # (L - 3) // 2 + 1 twice
    assert sorted({t.shape[1] for t in viz.hvt_stage_tokens(inter)}, reverse=True) == [64, 31, 15]
    # Stage 1 token 0 pools patches 0, 1, 2 of the first row: centroid (4, 12) px.
    np.testing.assert_allclose(stages[1][0], (4.0, 12.0))
    for s in stages:
        assert ((s > 0) & (s < 64)).all()
    assert_pngs(viz.draw_hvt(model, crop, inter, str(tmp_path)), ["hvt_pooled_positions.png"])
    # A scanned model (stacked blocks_1-1, blocks_3-3) gives the same per-block intermediates.
    scanned = model.clone(scan_blocks=True)
    stacked = jvit.convert.layout.match_layout(jax.device_get(variables), jvit.utils.abstract_variables(scanned))
    _, inter_s = viz.intermediates(scanned, stacked, x)
    assert sorted(inter_s) == sorted(inter)
    for a, b in zip(viz.hvt_stage_tokens(inter_s), viz.hvt_stage_tokens(inter)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sot_logit_parts_add_up_to_the_logits(tmp_path, photo):
    model, variables = tiny("sot_tiny", 112, embed_dim=24, depth=1, num_heads=2)
    crop, x = viz.prepare_image(photo, "sot_tiny", 112)
    logits, inter = viz.intermediates(model, variables, x)
    cls, visual = viz.sot_logit_parts(inter)
    np.testing.assert_allclose(cls + visual, logits, rtol=1e-5, atol=1e-6)
    top, c, v = viz.logit_split(cls[0], visual[0], k=3)
    assert list(top) == list(np.argsort(-logits[0])[:3])
    np.testing.assert_allclose(c + v, logits[0, top], rtol=1e-5, atol=1e-6)
    assert_pngs(viz.draw_sot(model, crop, inter, str(tmp_path)), ["sot_logit_split.png"])


def test_cli_on_a_converted_directory(tmp_path, photo):
    # A converted directory rebuilds a registered variant from its metadata (here HVT-Ti-1 at 64 px).
    model, variables = tiny("hvt_ti_1", 64)
    ckpt = jvit.checkpoint.save_variables(
        tmp_path / "ckpt", jax.device_get(variables), {"model": "hvt_ti_1", "num_classes": 7, "img_size": 64}
    )
    photo.save(tmp_path / "flower.jpg")
    assert viz.main([ckpt, str(tmp_path / "flower.jpg"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "00_flower" / "hvt_pooled_positions.png").is_file()
    assert viz.main([str(tmp_path / "nowhere"), str(tmp_path / "flower.jpg")]) == 1
