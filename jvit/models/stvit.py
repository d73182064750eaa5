"""STViT: vision transformer with super token sampling.

H. Huang, X. Zhou, J. Cao, R. He, T. Tan. "Vision Transformer with Super Token Sampling", CVPR 2023
(arXiv 2211.11167). The README of the original code calls the models SViT-S/B/L.

A four-stage hierarchical, fully convolutional network (no class token, no position tables)::

    image -> conv stem (stride 4)
          -> 4 stages of blocks [CPE -> x + STA(LN(x)) -> x + ConvFFN(BN(x))], PatchMerging between stages
          -> 1x1 conv to 1024 -> BN -> SiLU -> global average pool -> Linear

Super token attention (STA; the paper's method section) runs global attention over a few "super tokens"
instead of all tokens, in three steps:

1. super token sampling (STS): the token grid is cut into s x s cells, one super token per cell,
   initialised as the cell mean. Each token is softly associated with the super tokens of its own
   and the 8 surrounding cells (a 9-way softmax of scaled dot products); each super token becomes
   the association-weighted mean of the tokens associated with it. This association is sparse
   (9 entries per token) and carries no gradient;
2. multi-head self-attention among the super tokens;
3. token upsampling (TU): every token receives the association-weighted sum of its 9 refined
   super tokens.

Stages whose super-token size is 1 (the last two in every official model) use plain global
multi-head self-attention over all tokens instead.

Resolution: nothing depends on the input size, so one set of weights runs at any ``H x W`` (the
384 models are the 224 architectures fine-tuned). ``img_size`` only sets the dummy input used to
initialise variables and names the resolution of the released weights; inputs of any other
(also non-square) size are accepted. Token grids that are not a multiple of the super-token size
are zero-padded at the bottom/right inside STA and cropped back, exactly as the original.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jvit.models.layers import (
    Attention,
    BlockStack,
    DepthwiseConv2d,
    DropPath,
    Dtype,
    batch_norm,
    check_image,
    conv2d,
    dense,
    drop_path_rates,
    gelu,
    layer_norm,
    tokens_from_map,
    torch_dense,
)
from jvit.registry import PretrainedCfg, register_variant

# ---------------------------------------------------------------------------------------------
# The 3x3 super-token neighbourhood as a band over three super-token rows
# ---------------------------------------------------------------------------------------------

# Neighbour k of a cell sits at offset (dy, dx) = (k // 3 - 1, k % 3 - 1): row-major over the 3x3
# window, the order of the original's one-hot unfold kernels (and of the sown ``affinity``).
NEIGHBOURS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))

# Why a band: the pixels of cell row a are compared with ALL super tokens of the zero-padded rows
# a-1, a, a+1 (3 * (ww + 2) of them), and the ones outside the pixel's 3x3 window get probability 0.
# That is 3 * (ww + 2) / 9 times the multiply-adds of the 9 true neighbours (3x at 224 px, where
# ww = 7; it grows with the image width), but each of STA's three contractions (association, sampling,
# mapping back) becomes one batched matmul over (image, cell row) on the map in its own row-major
# layout: no cell-major copies of whole activations in and out, and no 9-way stacks of shifted slices.


def neighbour_rows(stokens: jax.Array) -> jax.Array:
    """``[B, hh, ww, C]`` -> ``[B, hh, 3, ww + 2, C]``: for cell row a, super-token rows a-1, a, a+1 with
    one zero column on each side; rows outside the grid are zero (the original's zero-padded Unfold)."""
    hh = stokens.shape[1]
    tp = jnp.pad(stokens, ((0, 0), (1, 1), (1, 1)) + ((0, 0),) * (stokens.ndim - 3))
    return jnp.stack([tp[:, dy : dy + hh] for dy in range(3)], axis=2)


def fold_rows(t: jax.Array) -> jax.Array:
    """The adjoint of :func:`neighbour_rows`: ``[B, hh, 3, ww + 2, ...]`` -> ``[B, hh, ww, ...]``, each
    band entry summed into the super token it stands for; entries for out-of-grid tokens are dropped
    (the original's Fold)."""
    hh = t.shape[1]
    rest = ((0, 0),) * (t.ndim - 4)
    acc = sum(jnp.pad(t[:, :, dy], ((0, 0), (dy, 2 - dy), (0, 0)) + rest) for dy in range(3))
    return acc[:, 1 : hh + 1, 1:-1]


def band_mask(ww: int) -> np.ndarray:
    """``[ww, 3 * (ww + 2)]`` bool: band column (dy, m) is a 3x3 neighbour of cell column n iff m - n in {0, 1, 2}."""
    diff = np.arange(ww + 2)[None, :] - np.arange(ww)[:, None]
    return np.tile((diff >= 0) & (diff <= 2), (1, 3))


def to_cells(x: jax.Array, s: int) -> jax.Array:
    """``[B, hh*s, ww*s, C]`` -> ``[B, hh, s, ww, s, C]`` (cell row, row in cell, cell column, column in
    cell): a reshape, no copy."""
    b, h, w, c = x.shape
    return x.reshape(b, h // s, s, w // s, s, c)


def associate(pixels: jax.Array, stokens: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """Pixel-to-super-token association (STS) of cell pixels ``[B, hh, s, ww, s, C]`` with super tokens
    ``[B, hh, ww, C]``: ``(A [B, hh, s, ww, s, 3 * (ww + 2)], Z [B, hh, ww])``.

    ``A`` over the band of :func:`neighbour_rows` is ``softmax(scale * <pixel, super token>)`` over the
    pixel's 3x3 neighbour cells and exactly 0 elsewhere. Out-of-grid neighbours are zero vectors: they
    take part in the softmax with logit 0 and soak up mass (no masking, as in the original). ``Z`` is
    each super token's total association (the column sums of the sparse association map).
    """
    b, hh, s, ww, _, c = pixels.shape
    rows = neighbour_rows(stokens).reshape(b, hh, 3 * (ww + 2), c)
    logits = jnp.einsum("bapc,baqc->bapq", pixels.reshape(b, hh, s * ww * s, c), rows)
    # The mask enters as an additive -inf bias so that it fuses into the softmax.
    outside = np.where(band_mask(ww), 0.0, -np.inf).astype(np.float32)[:, None]
    logits = logits.reshape(b, hh, s, ww, s, -1).astype(jnp.float32) * scale + outside
    affinity = jax.nn.softmax(logits, axis=-1)
    return affinity, fold_rows(affinity.sum(axis=(2, 3, 4)).reshape(b, hh, 3, ww + 2))


def sample_stokens(pixels: jax.Array, affinity: jax.Array, colsum: jax.Array) -> jax.Array:
    """Super tokens as association-weighted means of their pixels: ``[B, hh, ww, C]``."""
    b, hh, s, ww, _, c = pixels.shape
    num = jnp.einsum(
        "bapq,bapc->baqc", affinity.reshape(b, hh, s * ww * s, -1).astype(pixels.dtype), pixels.reshape(b, hh, -1, c)
    )
    num = fold_rows(num.reshape(b, hh, 3, ww + 2, c))
    return num / (colsum[..., None] + 1e-12).astype(num.dtype)


def neighbour_affinity(affinity: jax.Array) -> jax.Array:
    """The band association ``[B, hh, s, ww, s, 3 * (ww + 2)]`` as ``[B, hh*s, ww*s, 9]`` over
    :data:`NEIGHBOURS` (the original's layout), picking each pixel's 9 band entries."""
    b, hh, s, ww = affinity.shape[:4]
    pick = np.zeros((ww, 3, ww + 2, 9), np.float32)  # band (dy, m) of cell column n -> neighbour (dy, m - n)
    for n in range(ww):
        for k in range(9):
            pick[n, k // 3, n + k % 3, k] = 1.0
    picked = jnp.einsum("zaiyjq,yqk->zaiyjk", affinity, pick.reshape(ww, -1, 9))
    return picked.reshape(b, hh * s, ww * s, 9)


class SuperTokenAttention(nn.Module):
    """Super token attention (STA), the original's ``StokenAttention``, on ``[B, H, W, C]``.

    With ``stoken_size`` s > 1::

        X  = zero-pad(x) to multiples of s (bottom/right)        (padded pixels are zero vectors)
        S0 = mean of each s x s cell of X
        repeat n_iter times (no gradient):  A, Z = associate(X, S);  S = fold(A^T X) / (Z + 1e-12)
                                            (the last repetition keeps A, Z but not the update)
        S  = fold(A^T X) / (Z + 1e-12)                           (gradient through X only)
        S' = MHSA(S)                                             (scale head_dim^-0.5)
        y  = crop(A unfold(S'))                                  (gradient through S' only)

    with association scale ``C^-0.5`` (full width). With s == 1, plain global MHSA over all H*W
    tokens. A and Z carry no gradient (``stop_gradient``), like the original's ``no_grad``.

    Intermediates sown (s > 1): ``stokens_init``, ``affinity`` ``[B, Hp, Wp, 9]`` (neighbour k of
    pixel (y, x) is cell (y//s + dy_k, x//s + dx_k)), ``affinity_colsum`` ``[B, hh, ww, 1]``,
    ``stokens``, ``stokens_refined``.
    """

    stoken_size: int
    n_iter: int
    num_heads: int
    qkv_bias: bool = True
    qk_scale: float | None = None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, h, w, c = x.shape
        refine = Attention(
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias,
            qk_scale=self.qk_scale,
            attn_drop=self.attn_drop,
            proj_drop=self.proj_drop,
            torch_init=True,
            dtype=self.dtype,
            name="stoken_refine",
        )
        s = self.stoken_size
        if s == 1:
            return refine(x.reshape(b, h * w, c), train).reshape(b, h, w, c)
        if self.n_iter < 1:
            raise ValueError(f"n_iter must be >= 1 for super-token stages, got {self.n_iter}")

        pad_b, pad_r = -h % s, -w % s
        if pad_b or pad_r:
            x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        pixels = to_cells(x, s)
        hh, ww = pixels.shape[1], pixels.shape[3]

        # The association is a constant for autodiff (the original runs it under no_grad).
        const_pixels = jax.lax.stop_gradient(pixels)
        stokens = const_pixels.mean(axis=(2, 4))
        self.sow("intermediates", "stokens_init", stokens)
        for it in range(self.n_iter):
            affinity, colsum = associate(const_pixels, stokens, c**-0.5)
            if it < self.n_iter - 1:
                stokens = sample_stokens(const_pixels, affinity, colsum)
        affinity, colsum = jax.lax.stop_gradient((affinity, colsum))
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "affinity", neighbour_affinity(affinity))
            self.sow("intermediates", "affinity_colsum", colsum[..., None])

        stokens = sample_stokens(pixels, affinity, colsum)
        self.sow("intermediates", "stokens", stokens)
        stokens = refine(stokens.reshape(b, hh * ww, c), train).reshape(b, hh, ww, c)
        self.sow("intermediates", "stokens_refined", stokens)

        # y = sum over the band of A * S': one matmul per cell row, written in the map's own layout.
        rows = neighbour_rows(stokens).reshape(b, hh, 3 * (ww + 2), c)
        out = jnp.einsum("bapq,baqc->bapc", affinity.reshape(b, hh, s * ww * s, -1).astype(rows.dtype), rows)
        return out.reshape(b, hh * s, ww * s, c)[:, :h, :w]


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class ResDWC(nn.Module):
    """Residual depthwise 3x3 convolution ``x + DWConv3x3(x)`` (the conditional position encoding
    of Chu et al., 2021, used as STViT's CPE and inside its ConvFFN)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x + DepthwiseConv2d(kernel_size=3, dtype=self.dtype, name="conv")(x)


class ConvFFN(nn.Module):
    """STViT's ConvFFN: ``fc2(ResDWC(drop(GELU(fc1(x)))))`` with 1x1-conv ``fc1``/``fc2`` (the
    original's ``Mlp``); the depthwise conv on the hidden width adds locality to the FFN."""

    hidden_features: int
    drop: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        x = torch_dense(features=self.hidden_features, in_features=c, name="fc1", dtype=self.dtype)(x)
        x = nn.Dropout(rate=self.drop)(gelu(x), deterministic=not train)
        x = ResDWC(dtype=self.dtype, name="conv")(x)
        x = torch_dense(features=c, in_features=self.hidden_features, name="fc2", dtype=self.dtype)(x)
        return nn.Dropout(rate=self.drop)(x, deterministic=not train)


class STBlock(nn.Module):
    """One STViT block (the original's ``StokenAttentionLayer``) on ``[B, H, W, C]``::

        x = x + DWConv3x3(x)                                  (CPE: rewrites the stream)
        x = x + DropPath(gamma_1 * STA(LN(x)))                (LayerNorm eps 1e-6)
        x = x + DropPath(gamma_2 * ConvFFN(BN(x)))            (BatchNorm, not LN)

    ``gamma_1``/``gamma_2`` (layer scale, per channel) exist only when ``layerscale`` is set.
    Intermediates sown: ``pos_embed/out`` (after the CPE), ``norm1/out`` (STA's input), ``attn/out``
    (STA's output) and those of :class:`SuperTokenAttention`; the block's output ``out`` is sown by the
    :class:`jvit.models.layers.BlockStack` that runs it.
    """

    stoken_size: int
    n_iter: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    layerscale: bool = False
    init_values: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        drop_path = DropPath(rate=self.drop_path)
        if self.layerscale:
            gamma_1 = self.param("gamma_1", nn.initializers.constant(self.init_values), (c,))
            gamma_2 = self.param("gamma_2", nn.initializers.constant(self.init_values), (c,))
        else:
            gamma_1 = gamma_2 = 1.0

        pos_embed = ResDWC(dtype=self.dtype, name="pos_embed")
        x = pos_embed(x)
        pos_embed.sow("intermediates", "out", x)
        norm1 = layer_norm(eps=1e-6, name="norm1", dtype=self.dtype)
        y = norm1(x)
        norm1.sow("intermediates", "out", y)
        attn = SuperTokenAttention(
            stoken_size=self.stoken_size,
            n_iter=self.n_iter,
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias,
            qk_scale=self.qk_scale,
            attn_drop=self.attn_drop,
            proj_drop=self.drop,
            dtype=self.dtype,
            name="attn",
        )
        y = attn(y, train)
        attn.sow("intermediates", "out", y)
        x = x + drop_path(gamma_1 * y, train)
        y = batch_norm(train, eps=1e-5, torch_momentum=0.1, name="norm2", dtype=self.dtype)(x)
        y = ConvFFN(hidden_features=int(c * self.mlp_ratio), drop=self.drop, dtype=self.dtype, name="mlp2")(y, train)
        return x + drop_path(gamma_2 * y, train)


class PatchEmbed(nn.Module):
    """Conv stem, stride 4: ``[conv3x3 -> GELU -> BN] x 4`` with strides 2, 1, 2, 1 and widths
    C/2, C/2, C, C. The activation comes BEFORE the norm. Names follow the original Sequential."""

    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        widths = (self.embed_dim // 2, self.embed_dim // 2, self.embed_dim, self.embed_dim)
        for i, (width, stride) in enumerate(zip(widths, (2, 1, 2, 1))):
            x = conv2d(
                features=width,
                kernel_size=3,
                in_features=x.shape[-1],
                stride=stride,
                padding=1,
                name=f"proj_{3 * i}",
                dtype=self.dtype,
            )(x)
            x = batch_norm(train, eps=1e-5, torch_momentum=0.1, name=f"proj_{3 * i + 2}", dtype=self.dtype)(gelu(x))
        return x


class PatchMerging(nn.Module):
    """Downsampling between stages: conv3x3 stride 2 (padding 1) -> BN, no activation."""

    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv2d(
            features=self.out_dim,
            kernel_size=3,
            in_features=x.shape[-1],
            stride=2,
            padding=1,
            name="proj_0",
            dtype=self.dtype,
        )(x)
        return batch_norm(train, eps=1e-5, torch_momentum=0.1, name="proj_1", dtype=self.dtype)(x)


class Stage(nn.Module):
    """``depth`` STViT blocks, then an optional :class:`PatchMerging` to ``out_dim`` (the original's
    ``BasicLayer``). The blocks are one :class:`jvit.models.layers.BlockStack` (rematerialised per
    ``remat``; ``scan``: one ``nn.scan`` over them): ``blocks_<i>`` unrolled, one stacked entry ``blocks``
    scanned. Intermediates sown: ``blocks_<i>/out`` (scanned: ``blocks/out`` ``[depth, B, H, W, C]``),
    the blocks' own, and ``downsample/out``."""

    depth: int
    stoken_size: int
    n_iter: int
    num_heads: int
    drop_paths: tuple[float, ...]
    out_dim: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop: float = 0.0
    attn_drop: float = 0.0
    layerscale: bool = False
    init_values: float = 1e-6
    remat: str = "none"
    scan: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        self.stack = BlockStack(
            block=STBlock,
            depth=self.depth,
            block_kwargs=dict(
                stoken_size=self.stoken_size,
                n_iter=self.n_iter,
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                qk_scale=self.qk_scale,
                drop=self.drop,
                attn_drop=self.attn_drop,
                layerscale=self.layerscale,
                init_values=self.init_values,
                dtype=self.dtype,
            ),
            drop_path_rate=self.drop_paths,
            scan=self.scan,
            remat=self.remat,
        )
        if self.out_dim is not None:
            self.downsample = PatchMerging(out_dim=self.out_dim, dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.stack(x, train)
        if self.out_dim is not None:
            x = self.downsample(x, train)
            self.downsample.sow("intermediates", "out", x)
        return x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class STViT(nn.Module):
    """Super Token Vision Transformer (the paper's overall architecture): stem, four stages, conv/BN/SiLU head.

    Takes normalised NHWC images of any size (see the module docstring; ``img_size`` is the
    default/initialisation resolution and sets ``token_grid``) and returns float32 logits
    ``[B, num_classes]``, or the pooled features ``[B, projection]`` when ``num_classes == 0``.

    Attributes mirror the original constructor: per-stage ``embed_dim``, ``depths``, ``num_heads``,
    ``n_iter`` (association iterations), ``stoken_size`` (super-token cell side; 1 = global MHSA),
    ``layerscale`` (with ``init_values``); ``projection`` is the head's 1x1-conv width.
    ``remat`` (``'none' | 'block' | 'dots'``) rematerialises every block's activations
    (:func:`jvit.models.layers.remat`). ``scan_blocks`` runs each stage's blocks as one ``nn.scan``
    (:class:`jvit.models.layers.BlockStack`): one traced block per stage, whatever its depth, and no
    residual-stream copies between its blocks in the backward pass. It compiles 1.2-1.6x faster, but on
    XLA:CPU the train step ran 1.2-1.7x slower scanned (stvit_small at 96 px, batch 8): keep it off for
    CPU training.

    Parameters and BN statistics mirror the original's state dict (``patch_embed``, ``layers_<s>`` with
    ``blocks_<i>`` and ``downsample``, ``proj``, ``norm``, ``head``). With ``scan_blocks`` each stage's
    blocks are one entry ``layers_<s>/blocks`` whose leaves (``params`` and ``batch_stats``) carry a
    leading ``depth_s`` axis, the layout :mod:`jvit.convert.layout` converts.

    Intermediates sown: ``patch_embed/out`` (the stem's output), ``layers_<s>/blocks_<i>/out`` (scanned:
    ``layers_<s>/blocks/out`` ``[depth_s, B, H, W, C]``, and every block intermediate stacked likewise) and
    the blocks' own (:class:`STBlock`, :class:`SuperTokenAttention`: ``affinity``, ``stokens``, ...),
    ``layers_<s>/downsample/out``, ``tokens`` (the last stage's tokens), ``head_act`` (the head's
    SiLU(BN(proj(tokens))) ``[B, N, projection]`` before pooling) and ``features`` (its token mean,
    what the linear ``head`` reads).
    """

    num_classes: int
    embed_dim: Sequence[int]
    depths: Sequence[int]
    num_heads: Sequence[int]
    n_iter: Sequence[int] = (1, 1, 1, 1)
    stoken_size: Sequence[int] = (8, 4, 1, 1)
    projection: int = 1024
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    layerscale: Sequence[bool] = (False, False, False, False)
    init_values: float = 1e-6
    img_size: int | tuple[int, int] = 224
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: str = "none"
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32

    def _check_config(self) -> None:
        fields = ("embed_dim", "depths", "num_heads", "n_iter", "stoken_size", "layerscale")
        lengths = {f: len(getattr(self, f)) for f in fields}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"per-stage settings must have one entry per stage; got lengths {lengths}")
        for i, (dim, heads) in enumerate(zip(self.embed_dim, self.num_heads)):
            if dim % heads:
                raise ValueError(f"stage {i}: embed_dim {dim} is not divisible by num_heads {heads}")
        if any(s < 1 for s in self.stoken_size):
            raise ValueError(f"stoken_size entries must be >= 1, got {tuple(self.stoken_size)}")

    def setup(self):
        self._check_config()
        self.patch_embed = PatchEmbed(embed_dim=self.embed_dim[0], dtype=self.dtype)
        self.pos_drop = nn.Dropout(rate=self.drop_rate)
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        num_stages = len(self.depths)
        self.layers = [
            Stage(
                depth=self.depths[i],
                stoken_size=self.stoken_size[i],
                n_iter=self.n_iter[i],
                num_heads=self.num_heads[i],
                drop_paths=tuple(rates[sum(self.depths[:i]) : sum(self.depths[: i + 1])]),
                out_dim=self.embed_dim[i + 1] if i + 1 < num_stages else None,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                qk_scale=self.qk_scale,
                drop=self.drop_rate,
                attn_drop=self.attn_drop_rate,
                layerscale=self.layerscale[i],
                init_values=self.init_values,
                remat=self.remat,
                scan=self.scan_blocks,
                dtype=self.dtype,
                name=f"layers_{i}",
            )
            for i in range(num_stages)
        ]
        self.proj = torch_dense(features=self.projection, in_features=self.embed_dim[-1], dtype=self.dtype)
        # Built in setup, so the train/eval mode arrives with each call.
        self.norm = batch_norm(None, eps=1e-5, torch_momentum=0.1, dtype=self.dtype)
        if self.num_classes:
            self.head = dense(features=self.num_classes, dtype=jnp.float32)

    @property
    def token_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the last stage's tokens for an ``img_size`` input: the stem's two and the
        PatchMergings' stride-2 3x3 convs (padding 1) each map a side ``n`` to ``ceil(n / 2)``."""
        size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        halvings = 2 + len(self.depths) - 1
        return tuple(-(-n // 2**halvings) for n in size)

    def forward_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images ``[B, H, W, 3]`` (any H and W) -> the last stage's tokens ``[B, N, C]``, row-major
        over its grid (``token_grid`` for ``img_size`` inputs)."""
        check_image(images, None, type(self).__name__)
        x = self.patch_embed(images.astype(self.dtype), train)
        self.patch_embed.sow("intermediates", "out", x)
        x = self.pos_drop(x, deterministic=not train)
        for stage in self.layers:
            x = stage(x, train)
        x = tokens_from_map(x)
        self.sow("intermediates", "tokens", x)
        return x

    def forward_head(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Tokens ``[B, N, C]`` -> float32 logits: ``head(mean_tokens(SiLU(BN(proj(tokens)))))`` (the
        original's 1x1 conv, BN and swish act per token, so no grid is needed); the pooled features
        ``[B, projection]`` when ``num_classes == 0``."""
        x = nn.silu(self.norm(self.proj(tokens), use_running_average=not train))
        self.sow("intermediates", "head_act", x)
        features = x.astype(jnp.float32).mean(axis=1)
        self.sow("intermediates", "features", features)
        if not self.num_classes:
            return features
        return self.head(features)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images ``[B, H, W, 3]`` (normalised, NHWC, any H and W) -> logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(images, train), train)


# ---------------------------------------------------------------------------------------------
# Official variants (spec: stoken_size (8, 4, 1, 1), n_iter 1, projection 1024, mlp_ratio 4)
# ---------------------------------------------------------------------------------------------


def _cfgs(name: str) -> tuple[PretrainedCfg, PretrainedCfg]:
    """Eval transforms of the released weights: 224 resizes to 256 then crops (crop_pct 0.875);
    384 resizes straight to 384 (crop_pct 1.0); bicubic, ImageNet mean/std; weights in ``'model'``."""
    stem = name.replace("_", "-")
    top1 = _TOP1[name]
    return tuple(
        PretrainedCfg(
            img_size=size,
            crop_pct=crop,
            weights_keys=("model",),
            files=(f"{stem}-{size}.pth",),
            top1=acc,
            manual_download=f"download {stem}-{size}.pth from the Google-Drive folder {_DRIVE}",
        )
        for size, crop, acc in ((224, 0.875, top1[0]), (384, 1.0, top1[1]))
    )


# The README of github.com/hhb072/STViT: weights only in a Google-Drive folder (a browser is needed),
# top-1 (224, 384) from its results table; no hashes published.
_DRIVE = "https://drive.google.com/drive/folders/1uaT5OarQd9iPrnFufHocHpM3zhyTcetB"
_TOP1 = {"stvit_small": (83.6, 85.0), "stvit_base": (84.8, 86.0), "stvit_large": (85.3, 86.4)}

# The factories of the original models/stvit.py (spec section 1.1); small's init_values is unused
# (no layer scale) but kept as the original passes it.
_VARIANTS = {
    "stvit_small": dict(
        embed_dim=(64, 128, 320, 512),
        depths=(3, 5, 9, 3),
        num_heads=(1, 2, 5, 8),
        layerscale=(False, False, False, False),
        init_values=1e-5,
    ),
    "stvit_base": dict(
        embed_dim=(96, 192, 384, 512),
        depths=(4, 6, 14, 6),
        num_heads=(2, 3, 6, 8),
        layerscale=(False, False, True, True),
        init_values=1e-6,
    ),
    "stvit_large": dict(
        embed_dim=(96, 192, 448, 640),
        depths=(4, 7, 19, 8),
        num_heads=(2, 3, 7, 10),
        layerscale=(False, False, True, True),
        init_values=1e-6,
    ),
}

for _name, _kw in _VARIANTS.items():
    register_variant(_name, "stvit", _cfgs(_name), STViT, **_kw)
