"""SoT and So-ViT: vision transformers with a second-order classification head.

J. Xie, R. Zeng, Q. Wang, Z. Zhou, P. Li. "SoT: Delving Deeper into Classification Head for
Transformer", arXiv 2104.10935 (v2, 2021; v1 "So-ViT: Mind Visual Tokens for Vision Transformer").

Both families share one skeleton::

    image -> conv token embedding (14x14 tokens) -> [cls] + tokens + frozen sinusoid pos_embed
          -> depth x pre-LN ViT block -> LayerNorm
          -> logits = cls_fc(x[:, 0]) + visual_fc(svPN(cross_covariance(x[:, 1:])))

* SoT: DenseNet-style token embedding; the head pools the word tokens with multi-headed global
  cross-covariance pooling (MGCrP) and singular value power normalisation (svPN).
* So-ViT: ResNet-bottleneck token embedding; a single cross-covariance between two BN/ReLU-reduced
  views of the tokens, also svPN-normalised.

The second-order head (:class:`SVPN`, :class:`MGCrP`, :class:`CrossCovariancePooling`,
:class:`SecondOrderClassifier`) takes any ``[batch, tokens, dim]`` sequence and so sits on any
backbone. Everything in it is batched matmuls inside the jitted program: no SVD, no host round
trip, loops only over the fixed (static) number of power iterations.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jvit.models.layers import (
    Block,
    BlockStack,
    Dtype,
    avg_pool_2d,
    batch_norm,
    check_image,
    conv2d,
    dense,
    layer_norm,
    max_pool_2d,
    sinusoid_table,
    tokens_from_map,
    trunc_normal_02,
)
from jvit.registry import PretrainedCfg, register_variant

# ---------------------------------------------------------------------------------------------
# The second-order head
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SVPNConfig:
    """Hyper-parameters of :class:`SVPN` (the official models use the defaults)."""

    alpha: float = 0.5
    iter_num: int = 1
    sv_num: int = 1


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The second-order head of a variant.

    Attributes:
      pooling: ``'mgcrp'`` (SoT: ``dims = (heads, wr_dim)``) or ``'cross'`` (So-ViT: ``dims = (d1, d2)``).
      dims: see ``pooling``.
      svpn: power-normalisation settings.
      dropout: dropout before ``visual_fc`` (the original's ``regular``).
    """

    pooling: Literal["mgcrp", "cross"]
    dims: tuple[int, int]
    svpn: SVPNConfig = SVPNConfig()
    dropout: float = 0.0


# The second-order statistics (covariance, svPN's power iteration) are float32 math: without an explicit
# precision, XLA runs float32 contractions as one bf16 pass on TPU and as TF32 on Ampere+ GPUs.
FP32 = jax.lax.Precision.HIGHEST


def _normalize(a: jax.Array) -> jax.Array:
    """``a / max(||a||_2, 1e-12)`` over the last axis (``torch.nn.functional.normalize``)."""
    return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


class SVPN(nn.Module):
    """Singular value power normalisation of a batch of matrices ``X [..., n, m]``.

    Approximates ``U diag(sigma^alpha) V^T`` of the top ``sv_num`` singular triplets with
    ``iter_num`` steps of power iteration from a learned start vector ``weight`` (length ``m``),
    deflating after each triplet, and divides the remainder by ``s_last^(1-alpha) + eps``::

        R = X; acc = 0
        repeat sv_num:  v = weight
                        repeat iter_num: u = normalize(R v); v = normalize(R^T u)
                        s = u^T R v;  acc += s^alpha u v^T;  R -= s u v^T
        Y = acc + R / (s^(1-alpha) + eps)

    The same learned ``weight`` starts every deflation step. The head is computed in float32
    whatever the compute dtype, with full-precision contractions (:data:`FP32`): ``s`` can be small
    and ``eps`` is below bf16 resolution.

    Intermediates sown: ``svpn_sigma`` (the first singular value estimate).
    """

    alpha: float = 0.5
    iter_num: int = 1
    sv_num: int = 1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        w = self.param("weight", nn.initializers.normal(1.0), (x.shape[-1],), jnp.float32)
        residual, acc, sigma = x, jnp.zeros_like(x), None
        for step in range(self.sv_num):
            v = jnp.broadcast_to(w, x.shape[:-2] + w.shape)
            for _ in range(self.iter_num):
                u = _normalize(jnp.einsum("...nm,...m->...n", residual, v, precision=FP32))
                v = _normalize(jnp.einsum("...nm,...n->...m", residual, u, precision=FP32))
            # (u^T R) v, in the original's order of operations.
            s = jnp.einsum(
                "...m,...m->...", jnp.einsum("...n,...nm->...m", u, residual, precision=FP32), v, precision=FP32
            )
            if step == 0:
                self.sow("intermediates", "svpn_sigma", s)
            rank_one = s[..., None, None] * u[..., :, None] * v[..., None, :]
            acc = acc + jnp.power(s, self.alpha)[..., None, None] * u[..., :, None] * v[..., None, :]
            residual = residual - rank_one
            sigma = s
        return acc + residual / (jnp.power(sigma, 1.0 - self.alpha) + self.eps)[..., None, None]


class MGCrP(nn.Module):
    """Multi-headed global cross-covariance pooling (SoT's head), tokens ``[B, N, C]`` -> ``[B, h*d*d]``.

    One bias-free projection ``wr`` gives per head a ``Q`` and a ``K`` view of the tokens
    (``[N, d]`` each; output channels laid out ``(Q|K, head, d)``). Each view is centred by ONE
    scalar, the mean of all its ``N*d`` entries (the original's 3-D ``adaptive_avg_pool2d``; not a
    per-column mean), then ``Sigma = Q^T K / N`` is svPN-normalised and flattened row-major,
    heads first.
    """

    num_heads: int
    wr_dim: int
    svpn: SVPNConfig = SVPNConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        del train
        b, n, _ = tokens.shape
        p = dense(2 * self.num_heads * self.wr_dim, use_bias=False, name="wr", dtype=self.dtype)(tokens)
        p = p.astype(jnp.float32).reshape(b, n, 2, self.num_heads, self.wr_dim)
        q, k = p[:, :, 0], p[:, :, 1]  # [B, N, h, d]
        q = q - q.mean(axis=(1, 3), keepdims=True)
        k = k - k.mean(axis=(1, 3), keepdims=True)
        cov = jnp.einsum("bnhi,bnhj->bhij", q, k, precision=FP32) / n
        self.sow("intermediates", "cov", cov)
        y = SVPN(alpha=self.svpn.alpha, iter_num=self.svpn.iter_num, sv_num=self.svpn.sv_num, name="svpn")(cov)
        self.sow("intermediates", "svpn_out", y)
        return y.reshape(b, -1)


class CrossCovariancePooling(nn.Module):
    """So-ViT's cross-covariance pooling, tokens ``[B, N, C]`` -> ``[B, d1*d2]``.

    Two per-token reductions ``A = ReLU(BN(tokens W_q))`` (``d1`` wide) and
    ``B = ReLU(BN(tokens W_k))`` (``d2`` wide), each centred per channel over the tokens, give
    ``Sigma = A^T B / N`` (``[d1, d2]``). svPN runs on ``Sigma^T`` (start vector of length ``d1``)
    and its result is transposed back before the row-major flatten, as in the original.
    """

    dims: tuple[int, int]
    svpn: SVPNConfig = SVPNConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        b, n, _ = tokens.shape
        views = []
        for name, width in zip("qk", self.dims):
            v = ReduceBNReLU(features=width, dtype=self.dtype, name=f"reduce_{name}")(tokens, train).astype(jnp.float32)
            self.sow("intermediates", f"dr_{name}", v)
            views.append(v - v.mean(axis=1, keepdims=True))
        cov = jnp.einsum("bni,bnj->bij", *views, precision=FP32) / n
        self.sow("intermediates", "cov", cov)
        y = SVPN(alpha=self.svpn.alpha, iter_num=self.svpn.iter_num, sv_num=self.svpn.sv_num, name="svpn")(
            cov.swapaxes(-1, -2)
        )
        y = y.swapaxes(-1, -2)
        self.sow("intermediates", "svpn_out", y)
        return y.reshape(b, -1)


class ReduceBNReLU(nn.Module):
    """Per-token ``ReLU(BN(x W))``: So-ViT's 1x1 conv + BN + ReLU on the ``[B, C, N, 1]`` token view."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # kaiming-normal fan_out init of the original's conv_dr_block.
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        x = dense(self.features, use_bias=False, kernel_init=init, name="proj", dtype=self.dtype)(x)
        return nn.relu(batch_norm(train, eps=1e-5, torch_momentum=0.1, name="bn", dtype=self.dtype)(x))


class SecondOrderClassifier(nn.Module):
    """Second-order classification head fused with the class token (SoT's ``sum_fc`` fusion).

    On ``x = [B, 1 + N, C]`` (class token first)::

        logits = cls_fc(x[:, 0]) + visual_fc(dropout(pooling(x[:, 1:])))

    With ``use_cls_token=False`` the whole sequence is pooled and only ``visual_fc`` is used
    (the original's ``OnlyVisualTokensClassifier``), which lets the head sit on backbones without
    a class token. ``head.pooling`` picks :class:`MGCrP` or :class:`CrossCovariancePooling`.

    Intermediates sown: ``features_visual``, ``logits_cls``, ``logits_visual``.
    """

    num_classes: int
    head: HeadConfig
    use_cls_token: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        tokens = x[:, 1:] if self.use_cls_token else x
        h = self.head
        if h.pooling == "mgcrp":
            pooling = MGCrP(num_heads=h.dims[0], wr_dim=h.dims[1], svpn=h.svpn, dtype=self.dtype, name="pooling")
        elif h.pooling == "cross":
            pooling = CrossCovariancePooling(dims=h.dims, svpn=h.svpn, dtype=self.dtype, name="pooling")
        else:
            raise ValueError(f"unknown second-order pooling {h.pooling!r}; expected 'mgcrp' or 'cross'")
        z = pooling(tokens, train)
        self.sow("intermediates", "features_visual", z)
        z = nn.Dropout(rate=h.dropout)(z, deterministic=not train)
        logits = dense(self.num_classes, name="visual_fc", dtype=jnp.float32)(z)
        self.sow("intermediates", "logits_visual", logits)
        if self.use_cls_token:
            logits_cls = dense(self.num_classes, name="cls_fc", dtype=self.dtype)(x[:, 0])
            self.sow("intermediates", "logits_cls", logits_cls)
            logits = logits + logits_cls.astype(logits.dtype)
        return logits


# ---------------------------------------------------------------------------------------------
# Token embeddings
# ---------------------------------------------------------------------------------------------


def _stem(x: jax.Array, dtype: Dtype) -> jax.Array:
    """Conv3x3(3->64, bias) then MaxPool(3, s2, p1); no norm or activation between them."""
    x = conv2d(64, 3, in_features=x.shape[-1], padding=1, name="stem", dtype=dtype)(x)
    return max_pool_2d(x, window=3, stride=2, padding=1)


class DenseLayer(nn.Module):
    """DenseNet layer without BatchNorm: ``conv3x3(ReLU(conv1x1(ReLU(concat(features)))))``.

    timm's ``DenseBlock`` defaults its ``norm_layer`` to ``ReLU`` and SoT passes none, so the
    original's dense layers hold no BatchNorm at all.
    """

    growth: int = 16
    bottleneck: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: list[jax.Array]) -> jax.Array:
        h = nn.relu(jnp.concatenate(features, axis=-1))
        h = conv2d(self.bottleneck, 1, in_features=h.shape[-1], use_bias=False, name="conv1", dtype=self.dtype)(h)
        h = nn.relu(h)
        return conv2d(
            self.growth, 3, in_features=h.shape[-1], padding=1, use_bias=False, name="conv2", dtype=self.dtype
        )(h)


class DenseBlock(nn.Module):
    """``num_layers`` dense layers, each fed the concatenation of the block input and all earlier
    outputs (Huang et al., 2017, Eq. 2); returns that concatenation, input first."""

    num_layers: int = 6
    growth: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = [x]
        for layer in range(1, self.num_layers + 1):
            features.append(
                DenseLayer(growth=self.growth, bottleneck=2 * self.growth, dtype=self.dtype, name=f"denselayer{layer}")(
                    features
                )
            )
        return jnp.concatenate(features, axis=-1)


class DenseTransition(nn.Module):
    """SoT's transition: BN -> Conv1x1 (no bias) -> optional AvgPool 2x2; no ReLU.

    The conv runs before the pool as in the original (equal in exact arithmetic, not bitwise).
    """

    features: int = 128
    pool: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = batch_norm(train, eps=1e-5, torch_momentum=0.1, name="norm", dtype=self.dtype)(x)
        x = conv2d(self.features, 1, in_features=x.shape[-1], use_bias=False, name="conv", dtype=self.dtype)(x)
        return avg_pool_2d(x, window=2, stride=2) if self.pool else x


class DenseNetTokens(nn.Module):
    """SoT's DenseNet-style token embedding, ``[B, 224, 224, 3]`` -> ``[B, 14, 14, dim]``.

    stem (224->112) -> 3 x (DenseBlock of 6 layers, growth 16; transition to 128 ch + pool)
    -> Conv1x1(128 -> dim, bias). At ``img_size=112`` the last transition does not pool, so the
    grid is 14x14 in both supported sizes (the original's rule).
    """

    dim: int
    img_size: int = 224
    num_layers: int = 6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _stem(x, self.dtype)
        for stage in range(3):
            x = DenseBlock(num_layers=self.num_layers, dtype=self.dtype, name=f"stage_{2 * stage}")(x)
            pool = not (stage == 2 and self.img_size == 112)
            x = DenseTransition(features=128, pool=pool, dtype=self.dtype, name=f"stage_{2 * stage + 1}")(x, train)
        return conv2d(self.dim, 1, in_features=x.shape[-1], name="transition", dtype=self.dtype)(x)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), So-ViT flavour.

    ``bn1..bn3`` use eps 1e-3 / PyTorch momentum 0.01, the downsample BN eps 1e-5 / momentum 0.1,
    exactly as the original.
    """

    planes: int = 64
    stride: int = 2
    expansion: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_ch = self.planes * self.expansion
        d = self.dtype
        h = conv2d(self.planes, 1, in_features=x.shape[-1], use_bias=False, name="conv1", dtype=d)(x)
        h = nn.relu(batch_norm(train, eps=1e-3, torch_momentum=0.01, name="bn1", dtype=d)(h))
        h = conv2d(
            self.planes,
            3,
            in_features=h.shape[-1],
            stride=self.stride,
            padding=1,
            use_bias=False,
            name="conv2",
            dtype=d,
        )(h)
        h = nn.relu(batch_norm(train, eps=1e-3, torch_momentum=0.01, name="bn2", dtype=d)(h))
        h = conv2d(out_ch, 1, in_features=h.shape[-1], use_bias=False, name="conv3", dtype=d)(h)
        h = batch_norm(train, eps=1e-3, torch_momentum=0.01, name="bn3", dtype=d)(h)
        if self.stride != 1 or x.shape[-1] != out_ch:
            x = conv2d(
                out_ch, 1, in_features=x.shape[-1], stride=self.stride, use_bias=False, name="downsample_conv", dtype=d
            )(x)
            x = batch_norm(train, eps=1e-5, torch_momentum=0.1, name="downsample_bn", dtype=d)(x)
        return nn.relu(h + x)


class ResNetTokens(nn.Module):
    """So-ViT's ResNet-bottleneck token embedding, ``[B, S, S, 3]`` -> ``[B, S/16, S/16, dim]`` at S=224.

    stem (S -> S/2) -> Bottleneck(s2) -> Bottleneck(s2) -> Bottleneck(s = S // 112)
    -> Conv1x1(256 -> dim, bias).
    """

    dim: int
    img_size: int = 224
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _stem(x, self.dtype)
        for i, stride in enumerate((2, 2, self.img_size // 112)):
            x = Bottleneck(planes=64, stride=stride, dtype=self.dtype, name=f"stage_{i}")(x, train)
        return conv2d(self.dim, 1, in_features=x.shape[-1], name="transition", dtype=self.dtype)(x)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class SoT(nn.Module):
    """SoT / So-ViT: conv token embedding, class token + frozen sinusoid position table, pre-LN ViT
    blocks, final LayerNorm (eps 1e-5) and the second-order head fused with the class token.

    ``pos_embed`` lives in the ``frozen`` collection (the original's ``requires_grad=False``
    parameter): it is loaded from checkpoints, never trained, and regenerated as the sinusoid
    table on fresh init.

    The blocks are a :class:`jvit.models.layers.BlockStack`: ``blocks_<i>`` by default, one stacked
    ``blocks`` entry with ``scan_blocks=True`` (one traced block, so compile time does not grow with
    ``depth``; :mod:`jvit.convert.layout` converts variables between the layouts).

    Intermediates sown (the scheme of :mod:`jvit.models`): ``patch_embed`` ``[B, N, C]``,
    ``blocks_<i>/out`` (scanned: ``blocks/out`` ``[depth, B, 1 + N, C]``), ``tokens``, ``features`` (the
    class token ``cls_fc`` reads), and the head's under ``classifier/``: ``features_visual``,
    ``logits_cls``, ``logits_visual``, ``pooling/cov``, ``pooling/svpn_out``, ``pooling/svpn/svpn_sigma``
    (So-ViT also ``pooling/dr_q``, ``pooling/dr_k``).
    """

    num_classes: int
    embed: Literal["densenet", "resnet"]
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    head: HeadConfig
    img_size: int = 224
    qk_scale: float | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_blocks: bool = False

    @property
    def token_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the visual-token grid (14x14 at the official 224)."""
        if self.embed == "densenet":
            if self.img_size not in (112, 224):
                raise ValueError(f"SoT's DenseNet token embedding supports img_size 224 or 112, not {self.img_size}")
            return 14, 14
        if self.embed == "resnet":
            if self.img_size // 112 not in (1, 2) or self.img_size % (8 * (self.img_size // 112)):
                raise ValueError(
                    f"So-ViT's ResNet token embedding needs 112 <= img_size < 336 divisible by "
                    f"{8 * max(1, self.img_size // 112)}; got {self.img_size}"
                )
            g = self.img_size // (8 * (self.img_size // 112))
            return g, g
        raise ValueError(f"unknown token embedding {self.embed!r}; expected 'densenet' or 'resnet'")

    def setup(self):
        rows, cols = self.token_grid
        self.num_tokens = rows * cols
        tokens = DenseNetTokens if self.embed == "densenet" else ResNetTokens
        self.visual_tokens = tokens(dim=self.embed_dim, img_size=self.img_size, dtype=self.dtype)
        self.cls_token = self.param("cls_token", trunc_normal_02, (1, 1, self.embed_dim))
        self.pos_embed = self.variable(
            "frozen", "pos_embed", lambda: jnp.asarray(sinusoid_table(self.num_tokens + 1, self.embed_dim))
        )
        self.pos_drop = nn.Dropout(rate=self.drop_rate)
        self.stack = BlockStack(
            block=Block,
            depth=self.depth,
            block_kwargs=dict(
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=False,
                qk_scale=self.qk_scale,
                drop=self.drop_rate,
                norm_eps=1e-5,
                dtype=self.dtype,
            ),
            drop_path_rate=self.drop_path_rate,
            scan=self.scan_blocks,
            remat=self.remat,
        )
        self.norm = layer_norm(eps=1e-5, dtype=self.dtype)
        self.classifier = SecondOrderClassifier(num_classes=self.num_classes, head=self.head, dtype=self.dtype)

    def forward_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images ``[B, H, W, 3]`` -> final-LayerNorm tokens ``[B, 1 + N, C]`` (class token first)."""
        check_image(images, self.img_size, type(self).__name__)
        x = tokens_from_map(self.visual_tokens(images.astype(self.dtype), train))
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"token embedding gave {x.shape[1]} tokens, pos_embed has {self.num_tokens}")
        self.sow("intermediates", "patch_embed", x)
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[2]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.value.astype(x.dtype)
        x = self.pos_drop(x, deterministic=not train)
        x = self.norm(self.stack(x, train))
        self.sow("intermediates", "tokens", x)
        return x

    def forward_head(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Tokens ``[B, 1 + N, C]`` -> float32 logits ``cls_fc(x[:, 0]) + visual_fc(svPN(pool(x[:, 1:])))``."""
        self.sow("intermediates", "features", tokens[:, 0])
        return self.classifier(tokens, train)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images ``[B, H, W, 3]`` (normalised, NHWC) -> logits ``[B, num_classes]`` in float32."""
        return self.forward_head(self.forward_features(images, train), train)


# ---------------------------------------------------------------------------------------------
# Official variants
# ---------------------------------------------------------------------------------------------

_EMA_CFG = PretrainedCfg(weights_keys=("state_dict_ema", "state_dict"))

# So-ViT releases: direct Aliyun links and Google-Drive copies from the README of github.com/jiangtaoxie/SoT
# at commit c2d076e (2021-04-28; later READMEs dropped So-ViT); top-1 is the paper's figure (the README's
# "Upgrade" column lists 76.8 / 78.7 / 82.3 / 82.8 for the same files); no hashes published. The SoT
# variants have no released weights ("Coming soon").
_SOVIT_OSS = "https://jiangtaoxie.oss-cn-beijing.aliyuncs.com/So-ViT/"
_SOVIT_RELEASES = {
    "sovit_7": dict(
        file="So-ViT-7.pth.tar",
        version="CAEQAhiBgIDLutbayBciIGI0ZDEwN2ZiZjk3MjQxMjY5ODQxMTU3OGYxZjYzZWYz",
        drive_id="1-MTuAbQ-T6skfqHEYrhb9BmitG1iu5SY",
        top1=76.2,
    ),
    "sovit_10": dict(
        file="So-ViT-10.pth.tar",
        version="CAEQAhiBgMDHutbayBciIDViOTY5ZDFlNTI0ZDQ5NWNhM2IxMTA3OWU4OTlmMmUw",
        drive_id="1biRaP_m8NR48buFEQQwCRQphR_Nz5Sjw",
        top1=77.9,
    ),
    "sovit_14": dict(
        file="So-ViT-14.pth.tar",
        version="CAEQAhiBgIDDutbayBciIGM1YjBlOTIxMjYyNDRhMjY4MjE1MzgxMDcyMjEyNTM1",
        drive_id="1A85Rlnaaya9GEpraaEKJsSaGsdqHU5YO",
        top1=81.8,
    ),
    "sovit_19": dict(
        file="So-ViT-19.pth.tar",
        version="CAEQAhiCgIDDutbayBciIGFkNGQ1ODUzNmQxZDRmYmU5YjQ1NzkxNDVmMTJjZDg0",
        drive_id="1Jv2lYVzJ5lY909MHYP3YORhAVsKxUAC9",
        top1=82.4,
    ),
}


def _release_cfg(name: str) -> PretrainedCfg:
    """``_EMA_CFG`` with the release facts of ``name`` (none for the unreleased SoT variants)."""
    if name not in _SOVIT_RELEASES:
        return _EMA_CFG
    r = _SOVIT_RELEASES[name]
    return dataclasses.replace(
        _EMA_CFG,
        files=(r["file"],),
        urls=(f"{_SOVIT_OSS}{r['file']}?versionId={r['version']}",),
        top1=r["top1"],
        manual_download=f"download {r['file']} from https://drive.google.com/file/d/{r['drive_id']}/view",
    )


# Spec section 1.1: SoT's MGCrP always has 6 heads; So-ViT's cross-covariance reduces to (d1, d2).
_VARIANTS = {
    "sot_tiny": dict(
        embed="densenet",
        embed_dim=240,
        depth=12,
        num_heads=4,
        mlp_ratio=2.5,
        head=HeadConfig(pooling="mgcrp", dims=(6, 14)),
    ),
    "sot_small": dict(
        embed="densenet",
        embed_dim=384,
        depth=14,
        num_heads=6,
        mlp_ratio=3.5,
        head=HeadConfig(pooling="mgcrp", dims=(6, 24), dropout=0.5),
    ),
    "sot_base": dict(
        embed="densenet",
        embed_dim=528,
        depth=24,
        num_heads=8,
        mlp_ratio=3.0,
        head=HeadConfig(pooling="mgcrp", dims=(6, 38), dropout=0.7),
    ),
    "sovit_7": dict(
        embed="resnet",
        embed_dim=256,
        depth=7,
        num_heads=4,
        mlp_ratio=2.0,
        head=HeadConfig(pooling="cross", dims=(48, 24)),
    ),
    "sovit_10": dict(
        embed="resnet",
        embed_dim=256,
        depth=10,
        num_heads=4,
        mlp_ratio=2.0,
        head=HeadConfig(pooling="cross", dims=(48, 24)),
    ),
    "sovit_14": dict(
        embed="resnet",
        embed_dim=384,
        depth=14,
        num_heads=6,
        mlp_ratio=3.0,
        head=HeadConfig(pooling="cross", dims=(64, 48), dropout=0.5),
    ),
    "sovit_19": dict(
        embed="resnet",
        embed_dim=448,
        depth=19,
        num_heads=7,
        mlp_ratio=3.0,
        head=HeadConfig(pooling="cross", dims=(96, 48), dropout=0.5),
    ),
}

for _name, _cfg in _VARIANTS.items():
    register_variant(_name, "sot", _release_cfg(_name), SoT, **_cfg)
