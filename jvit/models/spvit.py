"""SP-ViT: vision transformers with learned 2-D spatial priors in self-attention.

Y. Zhou, W. Xiang, C. Li, B. Wang, X. Wei, L. Zhang, M. Keuper, X. Hua. "SP-ViT: Learning 2D Spatial
Priors for Vision Transformers", BMVC 2022, arXiv 2206.07662 (code: ZhouYuxuanYX/SP-ViT).

SP-ViT is LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision
Transformers", NeurIPS 2021) with three additions: spatial-prior attention (SP-SA) in the early
blocks, a class token that only enters late, and a CPVT position block after every block::

    image -> conv stem (4 convs + BN/ReLU, then an 8x8/8 patchify conv)  -> S x S patch tokens
          -> + pos_embed (patch tokens only)
          -> blocks 0 .. k-1:  SP-SA blocks on the patch tokens (no class token yet)
          -> [cls] + tokens
          -> blocks k .. depth-1: plain multi-head attention blocks
          -> LayerNorm -> head(cls) and aux_head(every patch token)

    every block:  x = x + Attn(LN(x)) / skip_lam;  x = x + MLP(LN(x)) / skip_lam;  x = PosCNN(x)

Which blocks use SP-SA (``spsa_blocks``) and before which block the class token is inserted
(``cls_insert_block``) are explicit configuration. The original derives both from a run-time
argument (``local_up_to_layer``) and lets the position block guess whether a class token is present
from the parity of the token count; neither can be read back from the weights in every case.

Outputs (see :class:`SPViT`): eval mode returns ``head(cls) + 0.5 * max_tokens(aux_head(tokens))``,
the score the original validates; train mode returns a :class:`TokenLabelOutput` with the class
logits and the per-token logits that token labeling supervises.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal, NamedTuple

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
    Mlp,
    batch_norm,
    check_image,
    conv2d,
    dense,
    dot_product_attention,
    drop_path_rates,
    layer_norm,
    split_heads,
    tokens_from_map,
    trunc_normal_02,
)
from jvit.registry import PretrainedCfg, register_variant

PATCH = 16  # both stems reduce the image 16x


# ---------------------------------------------------------------------------------------------
# Spatial-prior self-attention (SP-SA)
# ---------------------------------------------------------------------------------------------


def relative_offsets(grid: int) -> np.ndarray:
    """The ``[L, L, 2]`` relative offsets ``(dx, dy)`` of key ``q`` seen from query ``p`` on a
    ``grid x grid`` token grid (row-major tokens, ``L = grid**2``).

    ``dx = col_q - col_p`` (left to right positive), ``dy = row_q - row_p`` (top to bottom
    positive): raw integers in ``[-(grid-1), grid-1]`` as float32, the input of the prior MLP.
    """
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    dx = cols[None, :] - cols[:, None]
    dy = rows[None, :] - rows[:, None]
    return np.stack([dx, dy], axis=-1).astype(np.float32)


def _unique_offsets(grid: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(2*grid-1)**2`` distinct offsets ``[U, 2]`` and, per (query, key) pair, the index of
    its offset among them ``[L, L]``."""
    span = 2 * grid - 1
    dy, dx = np.divmod(np.arange(span * span), span)
    unique = np.stack([dx, dy], axis=-1).astype(np.float32) - (grid - 1)
    rel = relative_offsets(grid).astype(np.int64) + (grid - 1)
    index = rel[..., 1] * span + rel[..., 0]
    return unique, index


class SpatialPriorAttention(nn.Module):
    """SP-SA, SP-ViT's spatial-prior-enhanced self-attention: the scaled logits are multiplied by
    a learned prior that depends only on the 2-D offset between query and key token::

        A = softmax_keys( (q k^T * scale) * P ),    out = proj(A v)
        P[h, p, q] = b2[h] + sum_m w2[h, m] * ReLU(w1[h, m] . (dx, dy) + b1[h, m])

    i.e. one 2 -> head_dim -> 1 ReLU MLP per head (``w1`` is a ``Linear(2, C)`` whose ``C`` hidden
    units are split head-major, ``w2`` is ``[C, 1]``, ``b2`` is ``[heads]``). The prior is
    multiplicative, input independent and unconstrained (it may be negative); at init ``w2 = 0``,
    ``b2 = 1``, so SP-SA starts as plain attention.

    ``q``/``k`` come from one fused projection ``qk`` (output ``(q|k, head, channel)``), ``v`` from a
    separate one. SP-SA only ever sees the ``L = S*S`` patch tokens, row-major.

    The original evaluates the MLP on all ``L*L`` (query, key) pairs (a ``[L, L, C]`` temporary,
    0.5 GB at 384 px); the prior only depends on the offset, so it is evaluated on the
    ``(2S-1)**2`` distinct offsets and gathered: the same per-element arithmetic.

    Intermediates sown: ``spsa_prior`` ``[heads, L, L]``, ``attn_probs`` ``[B, heads, L, L]``.
    """

    dim: int
    num_heads: int
    qkv_bias: bool = False
    qk_scale: float | None = None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self):
        if self.dim % self.num_heads:
            raise ValueError(f"width {self.dim} is not divisible by num_heads={self.num_heads}")
        self.qk = dense(2 * self.dim, use_bias=self.qkv_bias, dtype=self.dtype)
        self.v = dense(self.dim, use_bias=self.qkv_bias, dtype=self.dtype)
        # The prior MLP runs in float32 whatever the compute dtype: its inputs are integers up to +-23.
        self.w1 = dense(self.dim, dtype=jnp.float32)
        self.w2 = self.param("w2", nn.initializers.zeros, (self.dim, 1), jnp.float32)
        self.b2 = self.param("b2", nn.initializers.ones, (self.num_heads,), jnp.float32)
        self.proj = dense(self.dim, dtype=self.dtype)
        self.attn_dropout = nn.Dropout(rate=self.attn_drop)
        self.proj_dropout = nn.Dropout(rate=self.proj_drop)

    def prior(self, grid: int) -> jax.Array:
        """The spatial prior ``P`` ``[heads, L, L]`` (float32) on a ``grid x grid`` token grid."""
        unique, index = _unique_offsets(grid)
        hidden = nn.relu(self.w1(jnp.asarray(unique)))  # [U, C], unit h*hd + m belongs to head h
        hidden = hidden.reshape(-1, self.num_heads, self.dim // self.num_heads)
        table = jnp.einsum("hm,uhm->hu", self.w2.reshape(self.num_heads, -1), hidden) + self.b2[:, None]
        return table[:, index]

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, n, c = x.shape
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"SP-SA needs the tokens of a square grid (no class token); got {n} tokens")
        if c != self.dim:
            raise ValueError(f"SP-SA was built for width {self.dim}, got tokens of width {c}")
        head_dim = c // self.num_heads
        scale = self.qk_scale if self.qk_scale is not None else head_dim**-0.5

        q, k = split_heads(self.qk(x), 2, self.num_heads)
        v = self.v(x).reshape(b, n, self.num_heads, head_dim)
        prior = self.prior(grid)
        self.sow("intermediates", "spsa_prior", prior)

        # Scaled logits first, then the prior (the original's order); softmax in float32.
        out = dot_product_attention(
            q,
            k,
            v,
            scale,
            self.attn_dropout,
            train,
            on_probs=lambda p: self.sow("intermediates", "attn_probs", p),
            logits_fn=lambda logits: logits * prior,
        )
        return self.proj_dropout(self.proj(out.reshape(b, n, c)), deterministic=not train)


# ---------------------------------------------------------------------------------------------
# Stem, position block, transformer block
# ---------------------------------------------------------------------------------------------


class ConvStem(nn.Module):
    """LV-ViT's convolutional patch embedding, ``[B, H, W, 3]`` -> ``[B, H/16, W/16, dim]``.

    ``conv1`` 7x7/2 (pad 3) -> BN -> ReLU -> ``conv2`` 3x3 -> BN -> ReLU -> ``conv3`` 3x3 -> BN ->
    ReLU -> ``proj`` 8x8/8 (with bias, no activation). The three convs have no bias and ``width``
    channels (64 for SP-ViT-S/M, 128 for L); BN eps 1e-5, PyTorch momentum 0.1.
    """

    dim: int
    width: int = 64
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d, w = self.dtype, self.width
        x = conv2d(w, 7, in_features=x.shape[-1], stride=2, padding=3, use_bias=False, name="conv1", dtype=d)(x)
        x = nn.relu(batch_norm(train, eps=1e-5, torch_momentum=0.1, name="bn1", dtype=d)(x))
        x = conv2d(w, 3, in_features=w, padding=1, use_bias=False, name="conv2", dtype=d)(x)
        x = nn.relu(batch_norm(train, eps=1e-5, torch_momentum=0.1, name="bn2", dtype=d)(x))
        x = conv2d(w, 3, in_features=w, padding=1, use_bias=False, name="conv3", dtype=d)(x)
        x = nn.relu(batch_norm(train, eps=1e-5, torch_momentum=0.1, name="bn3", dtype=d)(x))
        return conv2d(self.dim, 8, in_features=w, stride=8, name="proj", dtype=d)(x)


class PatchifyStem(nn.Module):
    """ViT's patch embedding: one 16x16/16 conv with bias (the original's ``PatchEmbedNaive``)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        return conv2d(self.dim, PATCH, in_features=x.shape[-1], stride=PATCH, name="proj", dtype=self.dtype)(x)


class PosCNN(nn.Module):
    """CPVT's position encoding generator (Chu et al., "Conditional Positional Encodings for Vision
    Transformers", 2021: the PEG) with stride 1: on the patch tokens viewed as a ``S x S`` map,
    ``g <- g + DWConv3x3(g)`` (depthwise, with bias); a class token passes through unchanged.

    ``has_cls`` says whether token 0 is a class token. The original guesses it from the parity of
    the token count (odd = class token present), which is right for every official grid (196 and
    576 patches are even) but wrong for odd grids such as 7x7.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, has_cls: bool) -> jax.Array:
        b, t, c = x.shape
        patches = x[:, 1:] if has_cls else x
        n = patches.shape[1]
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"PosCNN needs the patch tokens of a square grid; got {n} (has_cls={has_cls})")
        g = patches.reshape(b, grid, grid, c)
        g = g + DepthwiseConv2d(kernel_size=3, dtype=self.dtype, name="proj_0")(g)
        patches = g.reshape(b, n, c)
        return jnp.concatenate([x[:, :1], patches], axis=1) if has_cls else patches


class SPViTBlock(nn.Module):
    """SP-ViT's transformer block: pre-LN attention and MLP branches divided by ``skip_lam`` (LV-ViT's
    residual scaling), then the position block::

        x = x + DropPath(Attn(LN1(x))) / skip_lam
        x = x + DropPath(MLP(LN2(x))) / skip_lam
        x = PosCNN(x)

    ``Attn`` is :class:`SpatialPriorAttention` when ``spatial_prior`` (patch tokens only, so
    ``has_cls`` must be false) and timm's multi-head attention (fused ``qkv``) otherwise. LayerNorm
    eps 1e-5, exact GELU, MLP ``dim -> mlp_ratio*dim -> dim``.

    Intermediates sown: the attention's ``attn/attn_probs`` (and ``attn/spsa_prior`` for SP-SA); the
    block's output ``out`` (after the position block) is sown by the :class:`BlockStack` running it.
    """

    num_heads: int
    mlp_ratio: float = 3.0
    skip_lam: float = 1.0
    spatial_prior: bool = False
    has_cls: bool = False
    qkv_bias: bool = False
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        drop_path = DropPath(rate=self.drop_path)
        y = layer_norm(eps=1e-5, name="norm1", dtype=self.dtype)(x)
        if self.spatial_prior:
            if self.has_cls:
                raise ValueError("SP-SA attends over the patch grid only; it cannot run after the class token is in")
            attn = SpatialPriorAttention(
                dim=c,
                num_heads=self.num_heads,
                qkv_bias=self.qkv_bias,
                attn_drop=self.attn_drop,
                proj_drop=self.drop,
                dtype=self.dtype,
                name="attn",
            )
        else:
            attn = Attention(
                num_heads=self.num_heads,
                qkv_bias=self.qkv_bias,
                attn_drop=self.attn_drop,
                proj_drop=self.drop,
                dtype=self.dtype,
                sow_probs=True,
                name="attn",
            )
        x = x + drop_path(attn(y, train), train) / self.skip_lam
        y = layer_norm(eps=1e-5, name="norm2", dtype=self.dtype)(x)
        y = Mlp(hidden_features=int(c * self.mlp_ratio), drop=self.drop, dtype=self.dtype, name="mlp")(y, train)
        x = x + drop_path(y, train) / self.skip_lam
        return PosCNN(dtype=self.dtype, name="pos_block")(x, has_cls=self.has_cls)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class TokenLabelOutput(NamedTuple):
    """Train-mode output of an SP-ViT with an auxiliary head (what token labeling trains on).

    A named tuple (so a pytree, and ``out[0]`` is the class output as for the original's
    ``(x_cls, x_aux, bbox)``; the box is not returned because the caller passes it in).

    Attributes:
      cls_logits: ``head(class token)`` ``[B, num_classes]`` float32. With MixToken it scores the
        mixed image (the loss mixes its target with ``lam = 1 - box_area / L``).
      aux_logits: ``aux_head(patch tokens)`` ``[B, L, num_classes]`` float32, tokens row-major over
        the ``S x S`` grid. With MixToken the box region is swapped back, so token ``i`` of sample
        ``b`` is aligned with sample ``b``'s own (unmixed) image and its dense label map.
    """

    cls_logits: jax.Array
    aux_logits: jax.Array


def fuse_logits(cls_logits: jax.Array, aux_logits: jax.Array) -> jax.Array:
    """The score SP-ViT/LV-ViT is evaluated with: ``cls + 0.5 * max over tokens of aux`` (per class)."""
    return cls_logits + 0.5 * aux_logits.max(axis=1)


def mix_tokens(x: jax.Array, box: jax.Array) -> jax.Array:
    """MixToken's region swap on a token map ``[B, S, S, ...]`` (Jiang et al., 2021, LV-ViT).

    Rows ``box[0]:box[2]`` and columns ``box[1]:box[3]`` of every sample are replaced by the same
    region of the batch-reversed sample (``x[::-1]``). ``box`` is the original's
    ``(bbx1, bby1, bbx2, bby2)``, int, possibly traced and possibly empty. The swap is its own
    inverse, which is how the aux logits are un-mixed.
    """
    box = jnp.asarray(box)
    rows = jnp.arange(x.shape[1])
    cols = jnp.arange(x.shape[2])
    inside = ((rows >= box[0]) & (rows < box[2]))[:, None] & ((cols >= box[1]) & (cols < box[3]))[None, :]
    inside = inside.reshape((1,) + inside.shape + (1,) * (x.ndim - 3))
    return jnp.where(inside, x[::-1], x)


class SPViT(nn.Module):
    """SP-ViT / LV-ViT with a late class token and a position block after every block.

    Attributes:
      num_classes: classes of ``head`` and ``aux_head``.
      embed_dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
      skip_lam: residual-branch divisor (S/M 2, L 3).
      spsa_blocks: indices of the blocks using SP-SA; all must come before ``cls_insert_block``.
      cls_insert_block: index of the first block that sees the class token. ``k > 0``: the class
        token (no position embedding) is concatenated in front of the tokens right before block
        ``k`` and ``pos_embed`` has ``L`` rows (the original's ``local_up_to_layer = k``). ``0``: the
        class token is prepended before the position embedding, which then has ``L + 1`` rows
        (plain LV-ViT, ``local_up_to_layer <= 0``). The original's ``local_up_to_layer >= depth``
        (class token never inserted, the head reads a patch token) is rejected.
      use_aux_head: the token-labeling ``aux_head`` on the patch tokens (the original's
        ``return_dense``); without it the model returns ``head(cls)`` in both modes.
      stem: ``'conv'`` (:class:`ConvStem` of ``stem_width`` channels) or ``'patchify'`` (one
        16x16 conv).
      img_size: square input side, a multiple of 16; fixes ``pos_embed`` (``S = img_size / 16``).
      drop_rate, attn_drop_rate, drop_path_rate: dropout / stochastic depth (linear over blocks).
      remat: activation rematerialisation of the blocks, ``'none' | 'block' | 'dots'``
        (:func:`jvit.models.layers.remat`).
      scan_blocks: run each maximal run of alike blocks (same attention type and class-token
        presence: the SP-SA blocks, the plain blocks before the class token, those after it) as one
        ``nn.scan`` (:class:`jvit.models.layers.BlockStack`): one traced block per run, whatever its
        length, and no residual-stream copies between the blocks of a run in the backward pass
        (SP-ViT-S at 128 px, batch 8, on 2 CPU cores: grad step 1.35 s and 6 s compile scanned, 9.3 s and
        246 s unrolled).

    Call: ``model.apply(variables, images, train=False, mix_box=None)`` on normalised NHWC images,
    ``forward_head(forward_features(images, train, mix_box), train, mix_box)``:

    * ``train=False``: float32 logits ``[B, num_classes]``, ``head(cls) + 0.5 * max_tokens(aux)``
      (just ``head(cls)`` without aux head); BN uses running statistics.
    * ``train=True`` with aux head: a :class:`TokenLabelOutput` (``cls_logits``, ``aux_logits``).
      Needs ``mutable=['batch_stats']`` (stem BN uses batch statistics) and a ``dropout`` rng when
      drop path / dropout is on. ``mix_box`` (int ``[4]``, the original's ``(bbx1, bby1, bbx2,
      bby2)`` on the ``S x S`` grid, sampled by the training code) applies MixToken to the stem
      output and un-mixes the aux logits; ``None`` trains without MixToken.
    * ``train=True`` without aux head: ``head(cls)`` logits.

    Parameters mirror the original's state dict (``patch_embed``, ``cls_token``, ``pos_embed``,
    ``blocks_<i>``, ``norm``, ``head``, ``aux_head``). With ``scan_blocks`` the blocks ``a .. b`` of a run
    are one entry ``blocks_<a>-<b>`` whose leaves carry a leading ``[b - a + 1]`` block axis (``blocks``
    when all blocks are alike, e.g. plain LV-ViT), the layout :mod:`jvit.convert.layout` converts:
    SP-ViT-S holds ``blocks_0-13`` (SP-SA) and ``blocks_14-15``, SP-ViT-L ``blocks_0-21`` and ``blocks_22-23``.

    Intermediates sown (the scheme of :mod:`jvit.models`): ``patch_embed/out`` (the stem's output
    map ``[B, S, S, C]``, before MixToken; the scheme's ``patch_embed``, one level down because the
    stem module itself is ``patch_embed``), ``blocks_<i>/out`` (after the position block), ``tokens``
    (final LayerNorm ``[B, 1 + L, C]``, class token first), ``features`` (the class token
    ``[B, C]`` that ``head`` reads); SP-ViT's own: ``blocks_<i>/attn/attn_probs`` and, for SP-SA
    blocks, ``blocks_<i>/attn/spsa_prior``, ``cls_logits`` (``head``) and ``aux_logits``
    (``aux_head`` on every patch token, before un-mixing). A scanned run sows its blocks' entries
    stacked under its own, ``blocks_<a>-<b>/out`` ``[b - a + 1, B, T, C]`` etc.
    (:func:`jvit.convert.layout.unstack_blocks` splits them per block).
    """

    num_classes: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 3.0
    skip_lam: float = 1.0
    spsa_blocks: tuple[int, ...] = ()
    cls_insert_block: int = 0
    use_aux_head: bool = True
    stem: Literal["conv", "patchify"] = "conv"
    stem_width: int = 64
    img_size: int = 224
    qkv_bias: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: str = "none"
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32

    @property
    def token_grid(self) -> tuple[int, int]:
        """The ``S x S`` grid of the patch tokens of :meth:`forward_features` (what MixToken boxes
        and dense token labels live on)."""
        return (self.img_size // PATCH, self.img_size // PATCH)

    def setup(self):
        if self.img_size % PATCH:
            raise ValueError(f"SP-ViT needs img_size divisible by {PATCH}; got {self.img_size}")
        if not 0 <= self.cls_insert_block < self.depth:
            raise ValueError(
                f"cls_insert_block must be in [0, depth={self.depth}); got {self.cls_insert_block} "
                "(the original with local_up_to_layer >= depth never inserts the class token)"
            )
        late = [i for i in self.spsa_blocks if not 0 <= i < self.cls_insert_block]
        if late:
            raise ValueError(
                f"spsa_blocks {late} are not before cls_insert_block={self.cls_insert_block}: SP-SA only runs on "
                "the patch tokens, before the class token is inserted"
            )
        rows, cols = self.token_grid
        if self.stem == "conv":
            self.patch_embed = ConvStem(dim=self.embed_dim, width=self.stem_width, dtype=self.dtype)
        elif self.stem == "patchify":
            self.patch_embed = PatchifyStem(dim=self.embed_dim, dtype=self.dtype)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; expected 'conv' or 'patchify'")
        self.cls_token = self.param("cls_token", trunc_normal_02, (1, 1, self.embed_dim))
        pos_rows = rows * cols + (self.cls_insert_block == 0)
        self.pos_embed = self.param("pos_embed", trunc_normal_02, (1, pos_rows, self.embed_dim))
        self.pos_drop = nn.Dropout(rate=self.drop_rate)
        rates = drop_path_rates(self.drop_path_rate, self.depth)
        # Blocks differ along the stack in their attention (SP-SA or not) and whether a class token
        # leads the tokens; each maximal run of alike blocks is one BlockStack (scanned with scan_blocks),
        # and the class token enters between two runs.
        kinds = [(i in self.spsa_blocks, i >= self.cls_insert_block) for i in range(self.depth)]
        stacks = []
        for (spatial_prior, has_cls), run in itertools.groupby(range(self.depth), key=kinds.__getitem__):
            run = list(run)
            stacks.append(
                BlockStack(
                    block=SPViTBlock,
                    depth=len(run),
                    block_kwargs=dict(
                        num_heads=self.num_heads,
                        mlp_ratio=self.mlp_ratio,
                        skip_lam=self.skip_lam,
                        spatial_prior=spatial_prior,
                        has_cls=has_cls,
                        qkv_bias=self.qkv_bias,
                        drop=self.drop_rate,
                        attn_drop=self.attn_drop_rate,
                        dtype=self.dtype,
                    ),
                    drop_path_rate=rates[run[0] : run[-1] + 1],
                    scan=self.scan_blocks,
                    remat=self.remat,
                    start=run[0],
                    segment=len(run) < self.depth,
                )
            )
        self.stacks = stacks
        self.norm = layer_norm(eps=1e-5, dtype=self.dtype)
        self.head = dense(self.num_classes, dtype=self.dtype)
        if self.use_aux_head:
            self.aux_head = dense(self.num_classes, dtype=self.dtype)

    def _check_mix_box(self, train: bool, mix_box: jax.Array | None) -> None:
        if mix_box is not None and not (train and self.use_aux_head):
            raise ValueError("mix_box (MixToken) is a train-mode augmentation of models with an aux head")

    def forward_features(self, images: jax.Array, train: bool = False, mix_box: jax.Array | None = None) -> jax.Array:
        """Images ``[B, H, W, 3]`` -> final-LayerNorm tokens ``[B, 1 + L, C]``, class token first,
        then the ``L = S*S`` patch tokens row-major over :attr:`token_grid`.

        ``mix_box`` (train mode, aux head only) applies MixToken to the stem output: the box
        region of every sample's token map comes from the batch-reversed sample.
        """
        self._check_mix_box(train, mix_box)
        check_image(images, self.img_size, type(self).__name__)
        x = self.patch_embed(images.astype(self.dtype), train)
        # Sown inside the stem (path ``patch_embed/out``): a top-level ``patch_embed`` would clash with the
        # stem's own scope, whose name the checkpoint's parameter names fix.
        self.patch_embed.sow("intermediates", "out", x)
        if mix_box is not None:
            x = mix_tokens(x, mix_box)
        x = tokens_from_map(x)
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[2]))
        if self.cls_insert_block == 0:
            x = jnp.concatenate([cls, x], axis=1)
        x = self.pos_drop(x + self.pos_embed.astype(x.dtype), deterministic=not train)
        for stack in self.stacks:
            if self.cls_insert_block > 0 and stack.start == self.cls_insert_block:
                x = jnp.concatenate([cls, x], axis=1)
            x = stack(x, train)
        x = self.norm(x)
        self.sow("intermediates", "tokens", x)
        return x

    def forward_head(
        self, tokens: jax.Array, train: bool = False, mix_box: jax.Array | None = None
    ) -> jax.Array | TokenLabelOutput:
        """Tokens ``[B, 1 + L, C]`` -> float32 outputs (see the class docstring for each mode).

        ``head`` reads the class token; ``aux_head`` scores every patch token. In eval the two are
        fused (:func:`fuse_logits`, the score the original validates); in train mode they are
        returned apart for token labeling, the aux logits un-mixed with the same ``mix_box``
        that :meth:`forward_features` mixed the tokens with.
        """
        self._check_mix_box(train, mix_box)
        self.sow("intermediates", "features", tokens[:, 0])
        cls_logits = self.head(tokens[:, 0]).astype(jnp.float32)
        self.sow("intermediates", "cls_logits", cls_logits)
        if not self.use_aux_head:
            return cls_logits
        aux_logits = self.aux_head(tokens[:, 1:]).astype(jnp.float32)
        self.sow("intermediates", "aux_logits", aux_logits)
        if not train:
            return fuse_logits(cls_logits, aux_logits)
        if mix_box is not None:
            b, _, k = aux_logits.shape
            aux_logits = mix_tokens(aux_logits.reshape(b, *self.token_grid, k), mix_box).reshape(b, -1, k)
        return TokenLabelOutput(cls_logits=cls_logits, aux_logits=aux_logits)

    def __call__(
        self, images: jax.Array, train: bool = False, mix_box: jax.Array | None = None
    ) -> jax.Array | TokenLabelOutput:
        """Normalised NHWC images -> logits (eval) or the train-mode outputs; see the class docstring."""
        return self.forward_head(self.forward_features(images, train, mix_box), train, mix_box)


# ---------------------------------------------------------------------------------------------
# Official variants
# ---------------------------------------------------------------------------------------------

# What the repository's train / fine-tune scripts build (spec §1): local_up_to_layer 14 (S), 10
# (M, main.py's default) and 22 (L); lvvit_l's ``order=['tr']*24`` path builds no SP-SA at all.
_VARIANTS: dict[str, dict[str, Any]] = {
    "spvit_s": dict(
        embed_dim=384,
        depth=16,
        num_heads=6,
        stem_width=64,
        skip_lam=2.0,
        spsa_blocks=tuple(range(14)),
        cls_insert_block=14,
    ),
    "spvit_m": dict(
        embed_dim=512,
        depth=20,
        num_heads=8,
        stem_width=64,
        skip_lam=2.0,
        spsa_blocks=tuple(range(10)),
        cls_insert_block=10,
    ),
    "spvit_l": dict(
        embed_dim=768, depth=24, num_heads=12, stem_width=128, skip_lam=3.0, spsa_blocks=(), cls_insert_block=22
    ),
}

# Eval crop (timm default_cfg: S 0.9, M/L 1.0, also used at 384) and the weights the original
# evaluated: the EMA model where training kept one (every 224 run, L's 384 fine-tune), the plain
# weights for the S/M 384 fine-tunes, which ran without EMA.
# The README of github.com/ZhouYuxuanYX/SP-ViT links every model to one GitHub release page, not to
# files, so the file names (and hashes) are unknown here: the weights are a manual download. Top-1
# from the README's table.
_RELEASE_PAGE = "https://github.com/ZhouYuxuanYX/SP-ViT/releases/tag/download"


def _cfg(size: int, crop: float, keys: tuple[str, ...], top1: float) -> PretrainedCfg:
    return PretrainedCfg(
        size,
        crop,
        weights_keys=keys,
        top1=top1,
        manual_download=(f"download the SP-ViT checkpoint for {size} px from the release page {_RELEASE_PAGE}"),
    )


_EMA = ("state_dict_ema", "state_dict", "model")
_RAW = ("state_dict", "model")
_CFGS: dict[str, tuple[PretrainedCfg, PretrainedCfg]] = {
    "spvit_s": (_cfg(224, 0.9, _EMA, 83.9), _cfg(384, 0.9, _RAW, 85.1)),
    "spvit_m": (_cfg(224, 1.0, _EMA, 84.9), _cfg(384, 1.0, _RAW, 86.0)),
    "spvit_l": (_cfg(224, 1.0, _EMA, 85.5), _cfg(384, 1.0, _EMA, 86.3)),
}


for _name, _spec in _VARIANTS.items():
    register_variant(_name, "spvit", _CFGS[_name], SPViT, **_spec)
