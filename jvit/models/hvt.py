"""HVT: a vision transformer that shrinks its token sequence by max pooling between stages.

Z. Pan, B. Zhuang, J. Liu, H. He, J. Cai. "Scalable Vision Transformers with Hierarchical
Pooling", ICCV 2021 (arXiv 2103.10619).

::

    image -> patch embedding (P x P conv, stride P) -> tokens [B, L0, C] + pos_embed   (no class token)
          -> num_blocks x pre-LN ViT block; a pooling block ends with
                 x = MaxPool1d(x) + its own stage pos_embed
          -> LayerNorm -> mean over tokens -> head

(the paper's Fig. 2: the blocks are partitioned into stages, a pooling layer follows the first block
of each stage, and the prediction uses the average of the last stage's tokens; the original code
has no class token at all).

Pooling is 1-D over the flattened (raster order) token sequence, channel-wise max over windows
of ``pool_kernel_size`` consecutive tokens, no padding, floor mode; windows cross image-row
boundaries. Block ``i`` pools iff ``pool_block_width > 0 and i % pool_block_width == 0``, so
block 0 always pools and a stage is ``pool_block_width`` blocks. With 224 / 16 and kernel 3 the
token counts are 196 -> 97 -> 48 -> 23 -> 11.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jvit.models.layers import (
    Block,
    BlockStack,
    Dtype,
    check_image,
    conv2d,
    dense,
    drop_path_rates,
    layer_norm,
    remat,
    tokens_from_map,
    trunc_normal_02,
)
from jvit.registry import PretrainedCfg, register_variant

NORM_EPS = 1e-6  # every LayerNorm of the original (norm1, norm2, final norm)


def pooled_length(length: int, kernel: int, stride: int) -> int:
    """Tokens left by a VALID, floor-mode 1-D max pool: ``floor((L - k) / s) + 1``."""
    return (length - kernel) // stride + 1


def max_pool_tokens(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """``torch.nn.MaxPool1d(kernel, stride)`` over the token axis of ``[B, L, C]`` (no padding, floor mode)."""
    return nn.max_pool(x, (kernel,), strides=(stride,), padding="VALID")


def token_counts(
    img_size: int, patch_size: int, num_blocks: int, pool_kernel_size: int, pool_stride: int, pool_block_width: int
) -> list[int]:
    """Token count entering block 0 followed by the count after each pooling block.

    Raises ``ValueError`` naming the block whose pooling window would not fit the sequence.
    """
    counts = [(img_size // patch_size) ** 2]
    for i in range(num_blocks):
        if pool_block_width and i % pool_block_width == 0:
            if counts[-1] < pool_kernel_size:
                raise ValueError(
                    f"HVT: block {i} pools {counts[-1]} tokens with kernel {pool_kernel_size}; the sequence is "
                    f"shorter than the window (token counts so far {counts}). Use a larger img_size, a smaller "
                    "patch_size / pool_kernel_size, or a larger pool_block_width."
                )
            counts.append(pooled_length(counts[-1], pool_kernel_size, pool_stride))
    return counts


class PatchEmbed(nn.Module):
    """Non-overlapping ``P x P`` patches, linearly embedded (a stride-``P`` conv), flattened row-major.

    Images ``[B, S, S, 3]`` -> tokens ``[B, (S // P)^2, C]`` (Dosovitskiy et al., 2021, Eq. 1).

    Intermediates sown: ``out``, the tokens (the model's ``patch_embed/out``: flax reserves the name
    ``patch_embed`` for this module, so the parent cannot sow a value under it).
    """

    embed_dim: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        x = conv2d(self.embed_dim, p, in_features=x.shape[-1], stride=p, name="proj", dtype=self.dtype)(x)
        x = tokens_from_map(x)
        self.sow("intermediates", "out", x)
        return x


class PoolingBlock(Block):
    """A pre-LN ViT block (qkv bias, exact GELU) that ends with HVT's pooling::

        x = Block(x)
        x = MaxPool1d(x, pool_kernel_size, pool_stride) + pos_embed

    This is the pooling layer of Pan et al. (Fig. 2) as the original code places it: after the MLP
    residual, with no norm or projection around it; ``pos_embed`` ``[1, L_out, C]`` is this block's
    own learned embedding of the pooled sequence.

    Intermediates sown: ``prepool``, the block's output before pooling.
    """

    pool_kernel_size: int = 3
    pool_stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = super().__call__(x, train)
        self.sow("intermediates", "prepool", x)
        x = max_pool_tokens(x, self.pool_kernel_size, self.pool_stride)
        pos_embed = self.param("pos_embed", trunc_normal_02, (1,) + x.shape[1:], jnp.float32)
        return x + pos_embed.astype(x.dtype)


class HVT(nn.Module):
    """Hierarchical Visual Transformer (Pan et al., ICCV 2021), eval and train.

    Attributes mirror the original's config keys (its ``input_size`` is ``img_size`` here):

    * ``patch_size``, ``num_heads``, ``head_dim`` (width ``C = num_heads * head_dim``), ``num_blocks``;
    * ``pool_kernel_size``: window of every 1-D max pool;
    * ``pool_stride``: stride of every pool. The original ignores its config value and always uses 2;
      the default 2 reproduces it, other values are an extension (token bookkeeping follows
      ``floor((L - k) / s) + 1``);
    * ``pool_block_width``: blocks per stage; block ``i`` pools iff ``i % pool_block_width == 0``.
      ``0`` means no pooling at all (HVT-S-0, which the original factory cannot express);
    * ``num_classes``: ``0`` returns the pooled features (the original's ``Identity`` head);
    * ``remat``: ``'none' | 'block' | 'dots'``, activation rematerialisation of every block
      (:func:`jvit.models.layers.remat`);
    * ``scan_blocks``: run each stage's plain blocks (those after its pooling block) as one
      ``nn.scan`` (:class:`jvit.models.layers.BlockStack`): one traced block per stage, whatever its
      length, and no residual-stream copies between the blocks of a run in the backward pass.

    ``drop_rate`` is dropout after the pos-embed, attention projection and MLP layers;
    ``drop_path_rate`` the stochastic depth of the last block (linear from 0; the recipe uses 0.1).
    The model only accepts ``img_size x img_size`` inputs: every pos-embed has a fixed length and
    the original never resizes them. The model has no ``token_grid``: the 1-D pooling windows cross
    image rows, so the pooled tokens form no grid (only HVT-S-0's unpooled tokens would).

    Parameters mirror the original's state dict (``patch_embed``, ``pos_embed``, ``blocks_<i>`` with
    ``blocks_<i>/pos_embed`` in pooling blocks, ``norm``, ``head``). With ``scan_blocks`` the plain blocks
    ``a .. b`` of a stage are one stacked entry ``blocks_<a>-<b>`` (``blocks`` without pooling), the
    layout :mod:`jvit.convert.layout` converts.

    Intermediates sown (the scheme of :mod:`jvit.models`): ``patch_embed/out`` (the scheme's
    ``patch_embed``, under the module that computes it), ``tokens_in`` (HVT's own:
    the patch tokens plus the global pos-embed, the sequence entering block 0 and the first stage of
    :func:`jvit.viz.hvt_stage_tokens`), ``blocks_<i>/out`` (a scanned run: ``blocks_<a>-<b>/out``
    ``[b - a + 1, B, L, C]``), ``blocks_<i>/prepool`` (pooling blocks:
    the output before the max pool), ``tokens`` (the final-LayerNorm tokens) and ``features`` (their
    mean, what the head reads).
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    num_heads: int = 6
    head_dim: int = 64
    num_blocks: int = 12
    mlp_ratio: float = 4.0
    pool_kernel_size: int = 3
    pool_stride: int = 2
    pool_block_width: int = 12
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: str = "none"
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        for field in ("patch_size", "num_heads", "head_dim", "num_blocks", "pool_kernel_size", "pool_stride"):
            if getattr(self, field) < 1:
                raise ValueError(f"HVT: {field} must be >= 1, got {getattr(self, field)}")
        if self.pool_block_width < 0:
            raise ValueError(f"HVT: pool_block_width must be >= 0 (0 = no pooling), got {self.pool_block_width}")
        if self.img_size < self.patch_size:
            raise ValueError(f"HVT: img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        self.token_counts = token_counts(
            img_size=self.img_size,
            patch_size=self.patch_size,
            num_blocks=self.num_blocks,
            pool_kernel_size=self.pool_kernel_size,
            pool_stride=self.pool_stride,
            pool_block_width=self.pool_block_width,
        )
        dim = self.num_heads * self.head_dim
        self.patch_embed = PatchEmbed(embed_dim=dim, patch_size=self.patch_size, dtype=self.dtype)
        self.pos_embed = self.param("pos_embed", trunc_normal_02, (1, self.token_counts[0], dim), jnp.float32)
        self.pos_drop = nn.Dropout(rate=self.drop_rate)
        rates = drop_path_rates(self.drop_path_rate, self.num_blocks)
        kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=True, drop=self.drop_rate)
        kwargs.update(norm_eps=NORM_EPS, dtype=self.dtype)
        # Stage s: its pooling block, then the run of plain blocks up to the next stage (with no pooling at
        # all, HVT-S-0, one run of every block). A run is one BlockStack, scanned with scan_blocks.
        w = self.pool_block_width or self.num_blocks
        stages = []
        for first in range(0, self.num_blocks, w):
            run = range(first + bool(self.pool_block_width), min(first + w, self.num_blocks))
            pool = None
            if self.pool_block_width:
                pool = remat(PoolingBlock, self.remat)(
                    **kwargs,
                    drop_path=rates[first],
                    pool_kernel_size=self.pool_kernel_size,
                    pool_stride=self.pool_stride,
                    name=f"blocks_{first}",
                )
            stack = None
            if len(run):
                stack = BlockStack(
                    block=Block,
                    depth=len(run),
                    block_kwargs=kwargs,
                    drop_path_rate=rates[run.start : run.stop],
                    scan=self.scan_blocks,
                    remat=self.remat,
                    start=run.start,
                    segment=len(run) < self.num_blocks,
                )
            stages.append((pool, stack))
        self.stages = stages
        self.norm = layer_norm(NORM_EPS, dtype=self.dtype)
        if self.num_classes:
            self.head = dense(self.num_classes, dtype=jnp.float32)

    def forward_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images ``[B, S, S, 3]`` -> final-LayerNorm tokens ``[B, L_last, C]`` (no class token; the raster
        order of the pooled sequence)."""
        check_image(images, self.img_size, type(self).__name__)
        x = self.patch_embed(images.astype(self.dtype))
        x = x + self.pos_embed.astype(x.dtype)
        self.sow("intermediates", "tokens_in", x)
        x = self.pos_drop(x, deterministic=not train)
        for pool, stack in self.stages:
            if pool is not None:
                x = pool(x, train)
                pool.sow("intermediates", "out", x)
            if stack is not None:
                x = stack(x, train)
        x = self.norm(x)
        self.sow("intermediates", "tokens", x)
        return x

    def forward_head(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Tokens ``[B, L, C]`` -> float32 logits ``[B, num_classes]`` (the features ``[B, C]`` with 0 classes).

        The features are the mean of all tokens (Pan et al., Fig. 2; there is no class token), computed
        in float32 whatever the compute dtype.
        """
        del train  # no dropout before the head in the original
        features = tokens.astype(jnp.float32).mean(axis=1)
        self.sow("intermediates", "features", features)
        return self.head(features) if self.num_classes else features

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images ``[B, S, S, 3]`` (normalised, NHWC) -> float32 logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(images, train), train)


# ---------------------------------------------------------------------------------------------
# Official variants (all: 224 px, patch 16, head_dim 64, 12 blocks, pool kernel 3 / stride 2)
# ---------------------------------------------------------------------------------------------

_VARIANTS = {
    "hvt_ti_1": dict(num_heads=3, pool_block_width=12),
    "hvt_s_0": dict(num_heads=6, pool_block_width=0),
    "hvt_s_1": dict(num_heads=6, pool_block_width=12),
    "hvt_s_2": dict(num_heads=6, pool_block_width=6),
    "hvt_s_3": dict(num_heads=6, pool_block_width=4),
    "hvt_s_4": dict(num_heads=6, pool_block_width=3),
    # "Scale HVT-Ti-4" of the README is the same 384-wide model (and file) as HVT-S-4.
    "scale_hvt_ti_4": dict(num_heads=6, pool_block_width=3),
}

# name: (released file under the GitHub releases, paper top-1 %).
# Files and top-1 from the README of github.com/zhuang-group/HVT (ImageNet table); sha256 not published.
_RELEASES = {
    "hvt_ti_1": ("v1.0/hvt_ti_1.pth", 69.64),
    "hvt_s_0": ("v1.0/hvt_s_0.pth", 80.39),
    "hvt_s_1": ("v1.1/hvt_s_1.pth", 78.00),
    "hvt_s_2": ("v1.0/hvt_s_2.pth", 77.36),
    "hvt_s_3": ("v1.0/hvt_s_3.pth", 76.32),
    "hvt_s_4": ("v1.0/scale_hvt_ti_4.pth", 75.23),
    "scale_hvt_ti_4": ("v1.0/scale_hvt_ti_4.pth", 75.23),
}
_RELEASES_URL = "https://github.com/zhuang-group/HVT/releases/download/"


def _cfg(name: str) -> PretrainedCfg:
    file, top1 = _RELEASES[name]
    return PretrainedCfg(weights_keys=("model",), files=(file.split("/")[1],), urls=(_RELEASES_URL + file,), top1=top1)


for _name, _kw in _VARIANTS.items():
    register_variant(_name, "hvt", _cfg(_name), HVT, **_kw)
