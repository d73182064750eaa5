"""Swin Transformer, and Swin with SoT's second-order head.

Z. Liu, Y. Lin, Y. Cao, H. Hu, Y. Wei, Z. Zhang, S. Lin, B. Guo. "Swin Transformer: Hierarchical
Vision Transformer using Shifted Windows", ICCV 2021 (arXiv 2103.14030).

As timm 0.4.12's ``swin_*_patch4_window7_224`` (the official microsoft/Swin-Transformer layout)::

    image -> Conv(4x4, stride 4) + LayerNorm -> stages i = 0..S-1 at resolution R/2^i:
               depth_i x Swin block (W-MSA, then SW-MSA shifted by window//2 in every odd block)
               -> patch merging (2x2 neighbours concatenated, LayerNorm, Linear 4C -> 2C), all but the last
          -> LayerNorm -> mean over tokens -> head

A Swin block (Sec. 3.2, Eq. 3) is ``x = x + DropPath(W-MSA(LN(x))); x = x + DropPath(MLP(LN(x)))``, the
attention computed inside non-overlapping ``M x M`` windows with a learned relative position bias
``B[h, i, j] = table[index(i, j), h]`` (Eq. 4; ``index`` from the 2-D offset of tokens i and j in the
window). In shifted blocks the map is cyclically rolled by ``-M//2`` before partitioning and rolled back
after; pairs of tokens that were not neighbours before the roll get -100 added to their logits (the
original's ``attn_mask``). A stage whose resolution is at most ``M`` uses one window of the whole map and
no shift. All LayerNorms use eps 1e-5.

With ``second_order`` set, the head is SoT's visual-token-only second-order head
(:class:`jvit.models.sot.SecondOrderClassifier` with ``use_cls_token=False``: MGCrP + svPN over the
final tokens, Xie et al., arXiv 2104.10935), the "Swin + ours" rows of SoT's README.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jvit.models import layers
from jvit.models.deit import PatchEmbed
from jvit.models.layers import DropPath, Dtype, Mlp, check_image, dense, drop_path_rates, layer_norm, trunc_normal_02
from jvit.models.sot import HeadConfig, SecondOrderClassifier
from jvit.registry import PretrainedCfg, register_variant

_EPS = 1e-5
# Added to the logits of token pairs that straddle a roll seam: the original's constant (not -inf).
_MASK_VALUE = -100.0


def relative_position_index(window: int) -> np.ndarray:
    """``[M*M, M*M]`` index into the ``(2M-1)^2`` relative-bias table for tokens ``i, j`` of an
    ``M x M`` window (row-major): ``(dy + M - 1) * (2M - 1) + (dx + M - 1)`` with ``(dy, dx) = pos_i - pos_j``."""
    rows, cols = np.divmod(np.arange(window * window), window)
    dy = rows[:, None] - rows[None, :] + window - 1
    dx = cols[:, None] - cols[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """``[nW, M*M, M*M]`` additive mask of the shifted windows of an ``H x W`` map rolled by ``-shift``.

    After the roll, the map splits along each axis into the regions ``[0, H-M)``, ``[H-M, H-shift)`` and
    ``[H-shift, H)``; tokens of one window attend only to tokens of the same region pair (mask 0) and
    get :data:`_MASK_VALUE` otherwise.
    """

    def regions(n: int) -> np.ndarray:
        r = np.zeros(n, np.int64)
        r[n - window : n - shift] = 1
        r[n - shift :] = 2
        return r

    label = regions(height)[:, None] * 3 + regions(width)[None, :]
    label = label.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    label = label.reshape(-1, window * window)
    return np.where(label[:, :, None] != label[:, None, :], _MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, nW, M*M, C]`` windows in row-major window order, row-major inside."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(x: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of :func:`window_partition`: ``[B, nW, M*M, C]`` -> ``[B, H, W, C]``."""
    b, _, _, c = x.shape
    x = x.reshape(b, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias (Liu et al., Eq. 4).

    On windows ``[B, nW, N, C]`` (``N = M*M``): ``softmax(q k^T / sqrt(d) + B + mask) v``, with the fused
    ``qkv`` projection laid out ``(q|k|v, head, channel)`` (timm's), ``B`` gathered from the learned
    ``relative_position_bias_table [(2M-1)^2, heads]`` and the optional additive ``mask [nW, N, N]``.
    """

    num_heads: int
    window: int
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: np.ndarray | None = None, train: bool = False) -> jax.Array:
        b, nw, n, c = x.shape
        h = self.num_heads
        if c % h:
            raise ValueError(f"width {c} is not divisible by num_heads={h}")
        table = self.param("relative_position_bias_table", trunc_normal_02, ((2 * self.window - 1) ** 2, h))
        qkv = dense(3 * c, use_bias=self.qkv_bias, name="qkv", dtype=self.dtype)(x)
        q, k, v = (a[..., 0, :, :] for a in jnp.split(qkv.reshape(b, nw, n, 3, h, c // h), 3, axis=3))
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32) * (c // h) ** -0.5
        bias = table[relative_position_index(self.window)]  # [N, N, heads]
        logits = logits + bias.transpose(2, 0, 1)
        if mask is not None:
            logits = logits + mask[None, :, None]
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        attn = nn.Dropout(self.attn_drop)(attn, deterministic=not train)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", attn, v).reshape(b, nw, n, c)
        out = dense(c, name="proj", dtype=self.dtype)(out)
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)


class SwinBlock(nn.Module):
    """One Swin block on tokens ``[B, H*W, C]`` of an ``H x W`` map: (shifted-)window attention + MLP,
    both pre-norm residual branches with stochastic depth. Sows its output as ``out``."""

    num_heads: int
    resolution: tuple[int, int]
    window: int
    shift: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        height, width = self.resolution
        b, length, c = x.shape
        if length != height * width:
            raise ValueError(f"Swin block expects {height}x{width}={height * width} tokens, got {length}")
        m, s = self.window, self.shift
        drop_path = DropPath(rate=self.drop_path)
        y = layer_norm(_EPS, name="norm1", dtype=self.dtype)(x).reshape(b, height, width, c)
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        mask = shifted_window_mask(height, width, m, s) if s else None
        y = WindowAttention(
            num_heads=self.num_heads,
            window=m,
            qkv_bias=self.qkv_bias,
            attn_drop=self.attn_drop,
            proj_drop=self.drop,
            dtype=self.dtype,
            name="attn",
        )(window_partition(y, m), mask, train)
        y = window_reverse(y, m, height, width)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + drop_path(y.reshape(b, length, c), train)
        y = layer_norm(_EPS, name="norm2", dtype=self.dtype)(x)
        y = Mlp(int(c * self.mlp_ratio), drop=self.drop, dtype=self.dtype, name="mlp")(y, train)
        x = x + drop_path(y, train)
        self.sow("intermediates", "out", x)
        return x


class PatchMerging(nn.Module):
    """Swin's downsampling (Sec. 3.1): each 2x2 neighbourhood concatenated in the order
    ``(0,0), (1,0), (0,1), (1,1)`` (row, col offsets), LayerNorm(4C), bias-free Linear 4C -> 2C."""

    resolution: tuple[int, int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        height, width = self.resolution
        b, _, c = x.shape
        x = x.reshape(b, height, width, c)
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = x.reshape(b, (height // 2) * (width // 2), 4 * c)
        x = layer_norm(_EPS, name="norm", dtype=self.dtype)(x)
        return dense(2 * c, use_bias=False, name="reduction", dtype=self.dtype)(x)


class SwinStage(nn.Module):
    """``depth`` Swin blocks (even ones unshifted, odd ones shifted by ``window // 2``) at one
    resolution, then patch merging when ``downsample``. The window shrinks to the map (and the
    shift is dropped) when the map is not larger than the window, as in the original. ``remat``
    rematerialises each block in the backward pass (:func:`jvit.models.layers.remat`)."""

    depth: int
    num_heads: int
    resolution: tuple[int, int]
    window: int
    mlp_ratio: float
    drop_paths: tuple[float, ...]
    downsample: bool
    drop: float = 0.0
    dtype: Dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        window, shift = self.window, self.window // 2
        if min(self.resolution) <= window:
            window, shift = min(self.resolution), 0
        if self.resolution[0] % window or self.resolution[1] % window:
            raise ValueError(
                f"a {self.resolution[0]}x{self.resolution[1]} token map does not split into "
                f"{window}x{window} windows; choose img_size so every stage's map is a multiple "
                "of the window"
            )
        # SwinBlock.__call__(self, x, train): train (argument 2) is static under remat.
        block = layers.remat(SwinBlock, self.remat, static_argnums=(2,))
        for i in range(self.depth):
            x = block(
                num_heads=self.num_heads,
                resolution=self.resolution,
                window=window,
                shift=0 if i % 2 == 0 else shift,
                mlp_ratio=self.mlp_ratio,
                drop=self.drop,
                drop_path=self.drop_paths[i],
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(layers.gradient_barrier(x), train)
        if self.downsample:
            if self.resolution[0] % 2 or self.resolution[1] % 2:
                raise ValueError(f"patch merging needs an even token map, got {self.resolution}")
            x = PatchMerging(resolution=self.resolution, dtype=self.dtype, name="downsample")(x)
        return x


class Swin(nn.Module):
    """Swin Transformer (no absolute position embedding, patch norm on), timm 0.4.12's module names
    (``patch_embed``, ``layers_<i>/blocks_<j>``, ``layers_<i>/downsample``, ``norm``, ``head``).

    With ``second_order`` the head is SoT's visual-token-only :class:`SecondOrderClassifier`
    (``classifier``) on the final tokens instead of the linear head on their mean. ``remat``
    rematerialises each Swin block in the backward pass (:func:`jvit.models.layers.remat`).

    Intermediates sown: ``tokens`` (final-norm tokens ``[B, N, C]``), ``features`` (their mean, what
    the linear head reads), ``layers_<i>/blocks_<j>/out``, and the SoT head's own.
    """

    num_classes: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    img_size: int = 224
    patch_size: int = 4
    window_size: int = 7
    mlp_ratio: float = 4.0
    second_order: HeadConfig | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    remat: str = "none"

    def setup(self):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.patch_embed = PatchEmbed(
            embed_dim=self.embed_dim, patch_size=self.patch_size, norm_eps=_EPS, dtype=self.dtype
        )
        self.pos_drop = nn.Dropout(rate=self.drop_rate)
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        stages, res = [], self.img_size // self.patch_size
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            start, last = sum(self.depths[:i]), i == len(self.depths) - 1
            stages.append(
                SwinStage(
                    depth=depth,
                    num_heads=heads,
                    resolution=(res, res),
                    window=self.window_size,
                    mlp_ratio=self.mlp_ratio,
                    drop_paths=tuple(rates[start : start + depth]),
                    downsample=not last,
                    drop=self.drop_rate,
                    dtype=self.dtype,
                    remat=self.remat,
                    name=f"layers_{i}",
                )
            )
            res = res if last else res // 2
        self.layers = stages
        self.norm = layer_norm(_EPS, dtype=self.dtype)
        if self.second_order is not None:
            self.classifier = SecondOrderClassifier(
                self.num_classes, self.second_order, use_cls_token=False, dtype=self.dtype
            )
        else:
            self.head = dense(self.num_classes, dtype=jnp.float32)

    @property
    def token_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the final stage's token map."""
        g = self.img_size // self.patch_size // 2 ** (len(self.depths) - 1)
        return g, g

    def forward_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images ``[B, H, W, 3]`` -> final-LayerNorm tokens ``[B, N, C]`` of the last stage (row-major)."""
        check_image(images, self.img_size, type(self).__name__)
        x = self.pos_drop(self.patch_embed(images.astype(self.dtype)), deterministic=not train)
        for stage in self.layers:
            x = stage(x, train)
        x = self.norm(x)
        self.sow("intermediates", "tokens", x)
        return x

    def forward_head(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Tokens ``[B, N, C]`` -> float32 logits: linear head on the token mean, or SoT's head."""
        if self.second_order is not None:
            return self.classifier(tokens, train)
        features = tokens.mean(axis=1)
        self.sow("intermediates", "features", features)
        return self.head(features)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images ``[B, H, W, 3]`` (normalised, NHWC) -> logits ``[B, num_classes]`` in float32."""
        return self.forward_head(self.forward_features(images, train), train)


# ---------------------------------------------------------------------------------------------
# Official variants
# ---------------------------------------------------------------------------------------------

_SWIN_URL = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"

# timm 0.4.12's swin_*_patch4_window7_224; the ImageNet-1k releases and top-1 of the Swin paper (Table 1a) /
# microsoft/Swin-Transformer README; eval: resize 224/0.9 bicubic, centre crop (timm's default_cfg).
_VARIANTS = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
_TOP1 = {"swin_tiny": 81.2, "swin_small": 83.2, "swin_base": 83.5}

# SoT's visual-only head: MGCrP 6 heads; wr_dim 38 + dropout 0.7 on Swin-B (SoT-Base's head: 95.87M
# params, SoT README 95.9M), wr_dim 24 + dropout 0.5 on Swin-T (SoT-Small's head: 31.21M vs the README's
# 31.6M; the README's models also changed the token embedding, and its head size for Swin-T is not stated).
_SOT_HEADS = {
    "swin_tiny": HeadConfig("mgcrp", (6, 24), dropout=0.5),
    "swin_base": HeadConfig("mgcrp", (6, 38), dropout=0.7),
}


def _cfg(name: str) -> PretrainedCfg:
    file = f"{name}_patch4_window7_224.pth"
    return PretrainedCfg(
        crop_pct=0.9,
        interpolation="bicubic",
        weights_keys=("model",),
        files=(file,),
        urls=(_SWIN_URL + file,),
        top1=_TOP1[name],
    )


for _name, _kw in _VARIANTS.items():
    register_variant(_name, "swin", _cfg(_name), Swin, **_kw)
for _name, _head in _SOT_HEADS.items():
    register_variant(
        f"{_name}_sot",
        "swin_sot",
        dataclasses.replace(_cfg(_name), top1=None),
        Swin,
        second_order=_head,
        **_VARIANTS[_name],
    )
