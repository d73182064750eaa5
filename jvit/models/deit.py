"""DeiT: data-efficient image transformers, and DeiT with SoT's second-order head.

H. Touvron, M. Cord, M. Douze, F. Massa, A. Sablayrolles, H. Jegou. "Training data-efficient image
transformers & distillation through attention", ICML 2021 (arXiv 2012.12877).

The network is timm's ``VisionTransformer`` (Dosovitskiy et al., ICLR 2021, Eq. 1-4) as timm 0.4.12
builds ``deit_*_patch16_224``::

    image -> Conv(16x16, stride 16) patch tokens -> [cls (+ dist)] + tokens + learned pos_embed
          -> depth x pre-LN block (qkv bias, exact GELU, LayerNorm eps 1e-6) -> LayerNorm
          -> head(x[:, 0])                                  (DeiT)
          -> (head(x[:, 0]) + head_dist(x[:, 1])) / 2        (DeiT distilled, eval; Touvron et al. Sec. 5.2)

With ``second_order`` set, the linear head is replaced by SoT's second-order head
(:class:`jvit.models.sot.SecondOrderClassifier`: ``cls_fc(x[:, 0]) + visual_fc(svPN(MGCrP(x[:, 1:])))``,
Xie et al., arXiv 2104.10935, Sec. 3), the "DeiT + ours" rows of SoT's README. SoT's authors also
replaced DeiT's patch embedding by their DenseNet token embedding; these variants keep DeiT's own
patch embedding so that the official DeiT weights initialise the whole backbone (hence the
parameter counts differ slightly from the README's, see ``_SOT_VARIANTS``).
"""

from __future__ import annotations

import dataclasses

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
    layer_norm,
    tokens_from_map,
    trunc_normal_02,
)
from jvit.models.sot import HeadConfig, SecondOrderClassifier
from jvit.registry import PretrainedCfg, register_variant


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches projected to ``embed_dim`` by a strided conv
    (``proj``, PyTorch's default init), as row-major tokens ``[B, (H/p)*(W/p), C]``; optionally
    followed by a LayerNorm ``norm`` (Swin's ``patch_norm``)."""

    embed_dim: int
    patch_size: int
    norm_eps: float | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        x = conv2d(self.embed_dim, p, in_features=x.shape[-1], stride=p, name="proj", dtype=self.dtype)(x)
        x = tokens_from_map(x)
        if self.norm_eps is not None:
            x = layer_norm(eps=self.norm_eps, name="norm", dtype=self.dtype)(x)
        return x


class DeiT(nn.Module):
    """DeiT / ViT with a class token (and a distillation token when ``distilled``).

    Parameters mirror timm's state dict (``cls_token``, ``dist_token``, ``pos_embed``, ``patch_embed``,
    ``blocks_<i>``, ``norm``, ``head``, ``head_dist``). With ``distilled`` the model returns, in train
    mode, the pair ``(logits_cls, logits_dist)`` for DeiT's hard-distillation loss and, in eval, their
    mean. With ``second_order`` the head is SoT's :class:`SecondOrderClassifier` (``classifier``).
    The blocks are a :class:`jvit.models.layers.BlockStack`: ``remat`` rematerialises each block in the
    backward pass, ``scan_blocks`` runs them as one ``nn.scan`` (stacked ``blocks`` layout; compile time
    independent of depth, and on XLA:CPU a faster backward).

    Intermediates sown: ``tokens`` (final-norm tokens), ``features`` (the class token the head reads;
    ``features_dist``: the distillation token), ``blocks_<i>/out``, and the SoT head's own.
    """

    num_classes: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224
    patch_size: int = 16
    mlp_ratio: float = 4.0
    distilled: bool = False
    second_order: HeadConfig | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_blocks: bool = False

    def setup(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.distilled and self.second_order is not None:
            raise ValueError("the SoT head reads the class token and the visual tokens; use distilled=False with it")
        grid = self.img_size // self.patch_size
        self.num_prefix = 2 if self.distilled else 1
        self.patch_embed = PatchEmbed(embed_dim=self.embed_dim, patch_size=self.patch_size, dtype=self.dtype)
        self.cls_token = self.param("cls_token", trunc_normal_02, (1, 1, self.embed_dim))
        if self.distilled:
            self.dist_token = self.param("dist_token", trunc_normal_02, (1, 1, self.embed_dim))
        self.pos_embed = self.param("pos_embed", trunc_normal_02, (1, grid * grid + self.num_prefix, self.embed_dim))
        self.pos_drop = nn.Dropout(rate=self.drop_rate)
        self.stack = BlockStack(
            block=Block,
            depth=self.depth,
            block_kwargs=dict(
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=True,
                drop=self.drop_rate,
                norm_eps=1e-6,
                dtype=self.dtype,
            ),
            drop_path_rate=self.drop_path_rate,
            scan=self.scan_blocks,
            remat=self.remat,
        )
        self.norm = layer_norm(eps=1e-6, dtype=self.dtype)
        if self.second_order is not None:
            self.classifier = SecondOrderClassifier(
                num_classes=self.num_classes, head=self.second_order, use_cls_token=True, dtype=self.dtype
            )
        else:
            # timm zero-initialises the classifier of a fresh ViT.
            self.head = dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=jnp.float32)
            if self.distilled:
                self.head_dist = dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=jnp.float32)

    @property
    def token_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the patch-token grid."""
        g = self.img_size // self.patch_size
        return g, g

    def forward_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images ``[B, H, W, 3]`` -> final-LayerNorm tokens ``[B, prefix + N, C]`` (class token first,
        then the distillation token when ``distilled``)."""
        check_image(images, self.img_size, type(self).__name__)
        x = self.patch_embed(images.astype(self.dtype))
        b, _, c = x.shape
        prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
        prefix = [jnp.broadcast_to(t.astype(x.dtype), (b, 1, c)) for t in prefix]
        x = jnp.concatenate([*prefix, x], axis=1) + self.pos_embed.astype(x.dtype)
        x = self.pos_drop(x, deterministic=not train)
        x = self.norm(self.stack(x, train))
        self.sow("intermediates", "tokens", x)
        return x

    def forward_head(self, tokens: jax.Array, train: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Tokens ``[B, prefix + N, C]`` -> float32 logits (a ``(cls, dist)`` pair in train mode when distilled)."""
        self.sow("intermediates", "features", tokens[:, 0])
        if self.second_order is not None:
            return self.classifier(tokens, train)
        logits = self.head(tokens[:, 0])
        if not self.distilled:
            return logits
        self.sow("intermediates", "features_dist", tokens[:, 1])
        logits_dist = self.head_dist(tokens[:, 1])
        if train:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Images ``[B, H, W, 3]`` (normalised, NHWC) -> logits ``[B, num_classes]`` in float32."""
        return self.forward_head(self.forward_features(images, train), train)


# ---------------------------------------------------------------------------------------------
# Official variants
# ---------------------------------------------------------------------------------------------

_DEIT_URL = "https://dl.fbaipublicfiles.com/deit/"

# Backbones of timm 0.4.12's deit_*_patch16_224 (patch 16, mlp 4, qkv bias); files and top-1 (224, centre
# crop 0.875 bicubic) from the DeiT paper, Table 5 / the facebookresearch/deit README.
_VARIANTS = {
    "deit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "deit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "deit_base": dict(embed_dim=768, depth=12, num_heads=12),
}
_RELEASES = {
    "deit_tiny": ("deit_tiny_patch16_224-a1311bcf.pth", 72.2),
    "deit_small": ("deit_small_patch16_224-cd65a155.pth", 79.8),
    "deit_base": ("deit_base_patch16_224-b5f2ef4d.pth", 81.8),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224-b40b3cf7.pth", 74.5),
    "deit_small_distilled": ("deit_small_distilled_patch16_224-649709d9.pth", 81.2),
    "deit_base_distilled": ("deit_base_distilled_patch16_224-df68dfff.pth", 83.4),
}

# SoT's head on each backbone: MGCrP with 6 heads and the wr_dim / dropout of SoT's own model of that
# size (SoT-Tiny 6x14, SoT-Small 6x24 + dropout 0.5, SoT-Base 6x38 + dropout 0.7; sot.md section 1.1).
# Parameters (params collection, 1000 classes) vs SoT's README "DeiT + ours":
#   deit_tiny_sot   6.93M vs 7.0M;  deit_small_sot 25.63M vs 26.9M;  deit_base_sot 95.6M vs 94.9M.
# README's models replaced the 16x16 patch embedding by SoT's DenseNet token embedding (and its
# DeiT-S+ours row is SoT-Small, depth 14 / mlp 3.5); these keep DeiT's backbone exactly so the
# released DeiT weights load into it.
_SOT_HEADS = {
    "deit_tiny": HeadConfig("mgcrp", (6, 14)),
    "deit_small": HeadConfig("mgcrp", (6, 24), dropout=0.5),
    "deit_base": HeadConfig("mgcrp", (6, 38), dropout=0.7),
}


def _cfg(release: str) -> PretrainedCfg:
    file, top1 = _RELEASES[release]
    return PretrainedCfg(
        crop_pct=0.875,
        interpolation="bicubic",
        weights_keys=("model",),
        files=(file,),
        urls=(_DEIT_URL + file,),
        top1=top1,
    )


for _name, _kw in _VARIANTS.items():
    register_variant(_name, "deit", _cfg(_name), DeiT, **_kw)
    register_variant(f"{_name}_distilled", "deit", _cfg(f"{_name}_distilled"), DeiT, distilled=True, **_kw)
    # The SoT variant starts from the plain DeiT release; its own top-1 is unknown (no SoT weights exist).
    register_variant(
        f"{_name}_sot",
        "deit_sot",
        dataclasses.replace(_cfg(_name), top1=None),
        DeiT,
        second_order=_SOT_HEADS[_name],
        **_kw,
    )
