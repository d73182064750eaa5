"""The JAX bicubic resize against torch's ``interpolate(mode='bicubic', align_corners=False)``, and its use
when starting a model at another input size from a converted directory (no torch on that path).

Tables are drawn at the scale of learned position embeddings (std 0.02, the originals' init); at that
scale the two agree to 1e-6 absolute. (Both are float32: on unit-scale values torch itself is ~5e-6 off
the exact float64 result, from its own rounding.)"""

import numpy as np
import pytest
import torch

import jvit
from jvit.models import resize
from jvit.train import state as state_lib


def torch_bicubic(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(np.array(grid)).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "src,dst", [((14, 14), (24, 24)), ((24, 24), (14, 14)), ((7, 5), (12, 9)), ((3, 3), (1, 2)), ((1, 97), (1, 287))]
)
def test_resize_grid_matches_torch(src, dst):
    grid = np.random.default_rng(0).normal(0, 0.02, src + (16,)).astype(np.float32)
    ours = np.asarray(resize.resize_grid(grid, dst))
    np.testing.assert_allclose(ours, torch_bicubic(grid, dst), rtol=0, atol=1e-6)


def test_resize_sequence_is_one_row_grid():
    seq = np.random.default_rng(1).normal(0, 0.02, (1, 48, 8)).astype(np.float32)
    ours = np.asarray(resize.resize_sequence(seq, 143))
    np.testing.assert_allclose(ours[0], torch_bicubic(seq[0][None], (1, 143))[0], rtol=0, atol=1e-6)


def test_bicubic_weights_rows_sum_to_one():
    for n, m in ((14, 24), (24, 14), (5, 5), (1, 3)):
        np.testing.assert_allclose(resize.bicubic_weights(n, m).sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(resize.bicubic_weights(6, 6), np.eye(6), atol=1e-12)


def test_fit_pos_embed_keeps_class_row():
    table = np.random.default_rng(2).normal(0, 0.02, (1, 1 + 16, 4)).astype(np.float32)
    out = resize.fit_pos_embed("params/pos_embed", table, (1, 1 + 36, 4))
    np.testing.assert_array_equal(out[:, :1], table[:, :1])
    np.testing.assert_allclose(
        out[0, 1:].reshape(6, 6, 4), torch_bicubic(table[0, 1:].reshape(4, 4, 4), (6, 6)), atol=1e-6
    )
    assert resize.fit_pos_embed("params/head/kernel", table, (1, 37, 4)) is None


def hvt_tiny(img_size):
    return jvit.create_model(
        "hvt_ti_1", num_classes=10, img_size=img_size, num_blocks=2, num_heads=2, head_dim=8, pool_block_width=1
    )


def test_merge_pretrained_resizes_hvt_global_and_stage_tables():
    import jax
    import jax.numpy as jnp

    small, large = hvt_tiny(64), hvt_tiny(96)
    v_small = small.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    v_large = large.init(jax.random.key(1), jnp.zeros((1, 96, 96, 3)))
    v_small = {k: v for k, v in v_small.items() if k != "intermediates"}
    v_large = {k: v for k, v in v_large.items() if k != "intermediates"}
    merged, reinit = state_lib.merge_pretrained(v_large, jax.device_get(v_small), num_classes=10)
    assert reinit == []
    src, out = np.asarray(v_small["params"]["pos_embed"]), merged["params"]["pos_embed"]
    np.testing.assert_allclose(out[0].reshape(6, 6, -1), torch_bicubic(src[0].reshape(4, 4, -1), (6, 6)), atol=1e-6)
    stage_src = np.asarray(v_small["params"]["blocks_0"]["pos_embed"])
    stage_out = merged["params"]["blocks_0"]["pos_embed"]
    assert stage_out.shape == v_large["params"]["blocks_0"]["pos_embed"].shape
    np.testing.assert_allclose(stage_out[0], torch_bicubic(stage_src[0][None], (1, stage_out.shape[1]))[0], atol=1e-6)
    logits = large.apply(merged, jnp.zeros((1, 96, 96, 3)))
    assert logits.shape == (1, 10) and np.isfinite(np.asarray(logits)).all()
