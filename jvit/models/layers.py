"""Small building blocks shared by every jvit model family.

The originals are PyTorch/timm code; these layers reproduce timm's numerics in Flax linen:

* exact (erf) GELU, since ``flax.linen.gelu`` defaults to the tanh approximation;
* LayerNorm / BatchNorm with the epsilon each original uses (Flax's LayerNorm default 1e-6 and
  BatchNorm momentum convention differ from PyTorch's);
* convolutions with explicit symmetric padding: ``'SAME'`` pads (0, 1) for stride 2 where PyTorch
  pads (1, 1), which shifts the sampling grid;
* initialisers that match PyTorch/timm defaults, so training from scratch starts where the
  original starts.

Everything works on channels-last (NHWC / ``[batch, tokens, dim]``) arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# timm's ``trunc_normal_(std=.02)`` truncates at an *absolute* +-2, i.e. at +-100 sigma: it is a plain
# normal for every practical purpose (Flax's truncated_normal would cut at +-2 sigma instead).
trunc_normal_02 = nn.initializers.normal(stddev=0.02)

# PyTorch's default Conv/Linear weight init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), +).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init for Conv/Linear: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU ``x * Phi(x)`` as ``torch.nn.GELU()`` computes it (Hendrycks & Gimpel, 2016).

    Written ``x/2 * (1 + erf(x/sqrt(2)))``, PyTorch's own formula: ``flax.linen.gelu``'s erfc form
    lowers to a piecewise expansion that XLA's CPU backend splits into several materialised
    passes (2-3x slower); the two agree to float32 rounding.
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * np.asarray(1.0 / math.sqrt(2.0), dtype=x.dtype)))


def layer_norm(eps: float, name: str | None = None, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """A LayerNorm over the last axis with the original's epsilon and the two-pass variance.

    ``use_fast_variance=False`` computes ``mean((x - mean)^2)`` like PyTorch instead of
    ``mean(x^2) - mean^2``, which loses digits when the mean is large.
    """
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def batch_norm(
    train: bool | None,
    eps: float = 1e-5,
    torch_momentum: float = 0.1,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
) -> nn.BatchNorm:
    """BatchNorm over every axis but the last, parameterised the PyTorch way.

    Flax's ``momentum`` is the weight of the old running value, PyTorch's the weight of the new
    one, hence ``1 - torch_momentum``. Batch statistics are used when ``train`` is true (and the
    ``batch_stats`` collection must then be mutable), running statistics otherwise; ``train=None``
    leaves the choice to each call (``norm(x, use_running_average=not train)``, for modules built in
    ``setup``).

    Deviation (training only): PyTorch updates ``running_var`` with the unbiased batch variance,
    Flax with the biased one; for the batch x spatial sizes these models train on the factor
    ``n / (n - 1)`` is below 1.0001.
    """
    return nn.BatchNorm(
        use_running_average=None if train is None else not train,
        momentum=1.0 - torch_momentum,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        name=name,
    )


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def conv2d(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    in_features: int,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    use_bias: bool = True,
    kernel_init: Initializer = torch_default_kernel_init,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
) -> nn.Module:
    """``torch.nn.Conv2d`` for NHWC input: explicit symmetric zero padding, PyTorch's default init.

    Arguments mirror PyTorch's constructor (``in_features`` is only needed for the default bias
    init); ``groups == in_features`` gives a depthwise convolution. The kernel is HWIO
    (``[kh, kw, in/groups, out]``). An unpadded, ungrouped convolution whose windows do not
    overlap (1x1, or stride equal to the kernel: a patch embedding) is a :class:`MatmulConv`, the
    same parameters computed as a matmul.
    """
    kh, kw = _pair(kernel_size)
    ph, pw = _pair(padding)
    bias_init = torch_default_bias_init((in_features // groups) * kh * kw)
    if (ph, pw, groups) == (0, 0, 1) and ((kh, kw) == (1, 1) or (kh, kw) == _pair(stride)):
        return MatmulConv(
            features,
            kernel_size=(kh, kw),
            strides=_pair(stride),
            use_bias=use_bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            name=name,
        )
    return nn.Conv(
        features,
        (kh, kw),
        strides=_pair(stride),
        padding=((ph, ph), (pw, pw)),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        name=name,
    )


class MatmulConv(nn.Module):
    """An unpadded convolution with non-overlapping windows on NHWC input, computed as a matmul:
    a pointwise one, ``y[b, i, j] = x[b, s*i, s*j] @ W + bias`` (of the strided subsample when
    ``strides > 1``), or a patch embedding (``strides == kernel_size``), each output the matmul of
    one flattened ``kh x kw`` patch.

    The parameters are ``nn.Conv``'s (``kernel [kh, kw, C_in, C_out]``, ``bias [C_out]``), so
    checkpoints and converters see a convolution. XLA's CPU backend runs these convolutions, and
    above all their kernel gradients, slower than the equal matmuls: SoT's DenseNet bottlenecks at
    112x112, 306 vs 132 ms; SP-ViT's 8x8/8 projection 64 -> 384 at 112x112, forward + backward
    142 vs 79 ms; a 16x16/16 patch embedding 3 -> 192 at 224, 10.8 vs 7.5 ms.
    """

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    use_bias: bool = True
    kernel_init: Initializer = torch_default_kernel_init
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        b, h, w, c = x.shape
        kernel = self.param("kernel", self.kernel_init, (kh, kw, c, self.features), jnp.float32)
        if (kh, kw) == (1, 1):
            x = x[:, ::sh, ::sw]
        else:  # strides == kernel_size: rows/columns past the last whole patch are dropped (floor)
            ho, wo = h // kh, w // kw
            x = x[:, : ho * kh, : wo * kw].reshape(b, ho, kh, wo, kw, c).transpose(0, 1, 3, 2, 4, 5)
            x = x.reshape(b, ho, wo, kh * kw * c)  # (i, j, c) order, as the HWIO kernel flattens
        kernel = kernel.reshape(kh * kw * c, self.features).astype(self.dtype)
        # The output cotangent is stored, as a Dense layer's is (see `dense`): SoT-Tiny's train step
        # 2042 -> 1895 ms.
        y = gradient_barrier(jnp.einsum("bhwk,kd->bhwd", x.astype(self.dtype), kernel))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
        return y


class DepthwiseConv2d(nn.Module):
    """Depthwise ``k x k`` convolution, stride 1, zero padding ``k // 2`` on NHWC input: the
    ``torch.nn.Conv2d(C, C, k, padding=k // 2, groups=C)`` of convolutional position encodings.

    Computed as ``k * k`` shifted multiply-adds of the padded input instead of a grouped
    convolution: XLA's CPU backend runs ``feature_group_count`` convolutions, and above all their
    gradients, an order of magnitude slower, while the shifted form fuses into one elementwise
    loop. Parameters are laid out like ``nn.Conv``'s (``kernel [k, k, 1, C]``, ``bias [C]``, PyTorch's
    default init), so checkpoints convert the same way.
    """

    kernel_size: int = 3
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, x.shape[-1]
        if k % 2 != 1:
            raise ValueError(f"DepthwiseConv2d needs an odd kernel_size, got {k}")
        kernel = self.param("kernel", torch_default_kernel_init, (k, k, 1, c), jnp.float32).astype(self.dtype)
        out = depthwise_conv2d(x.astype(self.dtype), kernel)
        if self.use_bias:
            out = out + self.param("bias", torch_default_bias_init(k * k), (c,), jnp.float32).astype(self.dtype)
        return out


def _shifted_taps(x: jax.Array, k: int):
    """``x`` zero-padded by ``k // 2``, cropped at each of the ``k * k`` offsets, row-major."""
    h, w, p = x.shape[1], x.shape[2], k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return [xp[:, i : i + h, j : j + w] for i in range(k) for j in range(k)]


@jax.custom_vjp
def depthwise_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``sum_ij x_padded[:, i : i + H, j : j + W] * kernel[i, j, 0]``: a stride-1, ``k // 2``-padded
    depthwise convolution (cross-correlation, as PyTorch's) of NHWC ``x`` with ``kernel [k, k, 1, C]``.

    The backward stores the output cotangent and the input (optimization barriers): the input
    gradient and each tap's kernel gradient read them ``k * k`` times, and XLA:CPU would otherwise
    fuse their producers (GELU and its backward, in STViT's ConvFFN) into every read.
    """
    k = kernel.shape[0]
    return sum(t * kernel[n // k, n % k, 0] for n, t in enumerate(_shifted_taps(x, k)))


def _depthwise_conv2d_fwd(x, kernel):
    return depthwise_conv2d(x, kernel), (jax.lax.optimization_barrier(x), kernel)


def _depthwise_conv2d_bwd(residuals, g):
    x, kernel = residuals
    g = jax.lax.optimization_barrier(g)
    k = kernel.shape[0]
    dx = depthwise_conv2d(g, kernel[::-1, ::-1])  # the adjoint of a cross-correlation: the flipped kernel
    dkernel = jnp.stack([jnp.sum(t * g, axis=(0, 1, 2)) for t in _shifted_taps(x, k)])
    return dx, dkernel.reshape(kernel.shape)


depthwise_conv2d.defvjp(_depthwise_conv2d_fwd, _depthwise_conv2d_bwd)


def dense(
    features: int,
    use_bias: bool = True,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
    kernel_init: Initializer = trunc_normal_02,
    bias_init: Initializer = nn.initializers.zeros,
) -> nn.Dense:
    """A Linear layer, by default with timm's ViT init (normal std 0.02, zero bias).

    Its output's cotangent is stored (:func:`gradient_barrier`): the kernel gradient
    ``x^T @ dy`` transposes ``dy``, and XLA:CPU otherwise fuses everything that produces ``dy``
    (GELU's backward, the rest of the block's backward) into that transpose, recomputing it in a
    slow loop (SP-ViT-S train step 3.73 -> 3.17 s, HVT-Ti-1 343 -> 316 ms).
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        name=name,
        dot_general=_dot_general_storing_cotangent,
    )


def _dot_general_storing_cotangent(*args, **kwargs) -> jax.Array:
    return gradient_barrier(jax.lax.dot_general(*args, **kwargs))


def torch_dense(
    features: int,
    *,
    in_features: int,
    use_bias: bool = True,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
) -> nn.Dense:
    """``torch.nn.Linear``, or a 1x1 ``Conv2d`` on channels-last input, with PyTorch's default init.

    Weight and bias ~ ``U(-1/sqrt(in_features), +)``; the kernel is ``[in, out]``.
    """
    return dense(features, use_bias, name, dtype, torch_default_kernel_init, torch_default_bias_init(in_features))


def max_pool_2d(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """``torch.nn.MaxPool2d`` on NHWC: explicit padding with -inf, floor mode.

    The maximum is taken over the window offsets' strided slices of the padded input (XLA:CPU runs
    this faster than ``reduce_window``: 40 vs 50 ms for SoT's stem pool at ``[8, 224, 224, 64]``).
    The gradient goes to the first maximum of each window in row-major order, as PyTorch's kernel
    routes it. It is computed here rather than by JAX's rule for ``reduce_window``, whose
    ``select_and_gather_add`` XLA:CPU runs 3x slower (same pool: 486 vs 145 ms forward + backward).
    """
    return _max_pool_2d(x, window, stride, padding, x.shape[1:3])


def _window_slices(x_padded: jax.Array, window: int, stride: int, out_hw: tuple[int, int]):
    """``(i, j, x_padded[:, i::stride, j::stride])`` cropped to the output grid, per window offset."""
    (ho, wo), (b, _, _, c) = out_hw, x_padded.shape
    for i in range(window):
        for j in range(window):
            end = (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c)
            yield i, j, jax.lax.slice(x_padded, (0, i, j, 0), end, (1, stride, stride, 1))


def _max_and_first_offset(x, window, stride, padding, in_hw):
    """The pooled maximum and, per output, the offset ``i * window + j`` (int8) of the first window
    cell holding it: one pass over the offsets, a later one winning only if strictly greater."""
    if window * window > 127:
        raise ValueError(f"max_pool_2d: window {window} too large for the int8 argmax offset")
    x_padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    out_hw = tuple((n + 2 * padding - window) // stride + 1 for n in in_hw)
    y = first = None
    for i, j, xs in _window_slices(x_padded, window, stride, out_hw):
        offset = jnp.int8(i * window + j)
        if y is None:
            y, first = xs, jnp.full(xs.shape, offset)
        else:
            first, y = jnp.where(xs > y, offset, first), jnp.maximum(y, xs)
    return y, first


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_2d(x: jax.Array, window: int, stride: int, padding: int, in_hw: tuple[int, int]) -> jax.Array:
    return _max_and_first_offset(x, window, stride, padding, in_hw)[0]  # under jit the offsets are dropped


def _max_pool_2d_fwd(x, window, stride, padding, in_hw):
    # The offsets are what the backward needs; the barrier stores them, so the backward does not
    # recompute the comparisons for every input cell it writes.
    y, first = _max_and_first_offset(x, window, stride, padding, in_hw)
    return y, jax.lax.optimization_barrier(first)


def _max_pool_2d_bwd(window, stride, padding, in_hw, first, g):
    # Each window offset (i, j) owns the outputs whose first maximum sits there; its gradient lands
    # on the padded input at rows i + stride*oh. Offsets are grouped by (i % stride, j % stride):
    # within a group they only shift by whole output cells, so each group is one plane of the
    # input's stride x stride phases, and interleaving the planes gives the input gradient with no
    # scatter.
    # The planes read g up to (window / stride)^2 times per input cell: store it rather than let
    # XLA fuse its producers (e.g. the summed backward of every DenseNet layer) into each read.
    g = jax.lax.optimization_barrier(g)
    b, ho, wo, c = g.shape
    nh, nw = ho + (window - 1) // stride, wo + (window - 1) // stride
    planes = {}
    for i in range(window):
        for j in range(window):
            si, sj = i // stride, j // stride
            part = jnp.where(first == i * window + j, g, 0)
            part = jnp.pad(part, ((0, 0), (si, nh - ho - si), (sj, nw - wo - sj), (0, 0)))
            phase = (i % stride, j % stride)
            planes[phase] = planes[phase] + part if phase in planes else part
    zero = jnp.zeros((b, nh, nw, c), g.dtype)
    rows = [jnp.stack([planes.get((pi, pj), zero) for pj in range(stride)], axis=3) for pi in range(stride)]
    dx = jnp.stack(rows, axis=2).reshape(b, nh * stride, nw * stride, c)
    # Rows and columns past the last window (floor mode) get no gradient.
    (h, w), hp, wp = in_hw, in_hw[0] + 2 * padding, in_hw[1] + 2 * padding
    dx = jnp.pad(dx, ((0, 0), (0, max(hp - nh * stride, 0)), (0, max(wp - nw * stride, 0)), (0, 0)))
    return (dx[:, padding : padding + h, padding : padding + w],)


_max_pool_2d.defvjp(_max_pool_2d_fwd, _max_pool_2d_bwd)


def avg_pool_2d(x: jax.Array, window: int, stride: int) -> jax.Array:
    """``torch.nn.AvgPool2d`` without padding on NHWC input."""
    return nn.avg_pool(x, (window, window), (stride, stride), "VALID")


def barrier_compiler_options() -> dict[str, str]:
    """``jax.jit`` compiler options that keep optimization barriers through XLA:CPU's fusion.

    XLA:CPU deletes optimization barriers (its ``cse_barrier_expander`` pass) before it fuses, so
    neither :func:`gradient_barrier` nor ``jax.checkpoint``'s barriers hold there: unrolled train
    steps recompute the residual gradient chain, and remat saves no memory. A step compiled with
    these options keeps them. Empty off CPU: GPU compilers drop barriers only after fusion and
    scheduling, where they have done their work.
    """
    return {"xla_disable_hlo_passes": "cse_barrier_expander"} if jax.default_backend() == "cpu" else {}


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
    """Identity whose cotangent is materialised: the backward pass puts an optimization barrier on it.

    A residual stack's backward is a chain ``g_l = g_{l+1} + (branch and LayerNorm backward)_l``
    of cheap elementwise ops. Left alone, XLA:CPU fuses the whole chain into every consumer of
    every ``g_l`` (the weight-gradient transposes, DropPath's mask) instead of storing it, so an
    unrolled depth-``L`` stack's backward recomputes ``O(L^2)`` block backwards (SP-ViT-S, batch 8:
    steps and compile about 10x slower). A barrier on each block's input cotangent stores ``g_l``
    once. On XLA:CPU it holds in steps compiled with :func:`barrier_compiler_options`; the forward
    is untouched.
    """
    return x


def _gradient_barrier_fwd(x):
    return x, None


def _gradient_barrier_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


gradient_barrier.defvjp(_gradient_barrier_fwd, _gradient_barrier_bwd)


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016), timm's ``DropPath``.

    In training each sample's residual branch is zeroed with probability ``rate`` and survivors
    are scaled by ``1 / (1 - rate)``; identity in eval. Uses the ``dropout`` rng stream.
    ``rate`` may be a traced scalar: the per-block rate a scanned :class:`BlockStack` feeds each block.
    """

    rate: float | jax.Array

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or (not isinstance(self.rate, jax.Array) and self.rate == 0.0):
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates rising linearly from 0 to ``rate`` (``torch.linspace``)."""
    return [float(r) for r in np.linspace(0.0, rate, depth)] if depth > 1 else [0.0] * depth


class Mlp(nn.Module):
    """Transformer feed-forward network ``fc2(drop(act(fc1(x))))`` (Vaswani et al., 2017, Eq. 2)."""

    hidden_features: int
    out_features: int | None = None
    drop: float = 0.0
    act: Callable[[jax.Array], jax.Array] = gelu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = self.out_features or x.shape[-1]
        x = dense(self.hidden_features, name="fc1", dtype=self.dtype)(x)
        x = self.act(x)
        x = nn.Dropout(self.drop)(x, deterministic=not train)
        x = dense(out, name="fc2", dtype=self.dtype)(x)
        return nn.Dropout(self.drop)(x, deterministic=not train)


def split_heads(x: jax.Array, parts: int, num_heads: int) -> tuple[jax.Array, ...]:
    """Split a fused projection ``[..., N, parts*C]`` laid out ``(part, head, channel)``.

    This is the timm layout of ``qkv`` (``reshape(B, N, 3, heads, hd)``). Returns ``parts``
    arrays of shape ``[..., N, heads, hd]``.
    """
    *lead, width = x.shape
    x = x.reshape(*lead, parts, num_heads, width // (parts * num_heads))
    return tuple(x[..., i, :, :] for i in range(parts))


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    dropout: nn.Dropout | None = None,
    train: bool = False,
    on_probs: Callable[[jax.Array], Any] | None = None,
    logits_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """``softmax(q k^T * scale) v`` per head on ``[B, N, heads, hd]`` inputs (Vaswani et al., Eq. 1).

    The softmax runs in float32 whatever the compute dtype, as in the originals' AMP training.
    ``on_probs`` (if given) receives the probabilities ``[B, heads, N, N]`` before dropout, e.g. to
    sow them as an intermediate. ``logits_fn`` (if given) maps the scaled float32 logits
    ``[B, heads, N, N]`` before the softmax, e.g. SP-SA's multiplicative spatial prior.

    Off CPU, without attention dropout in effect, ``on_probs`` or ``logits_fn``, this is
    ``jax.nn.dot_product_attention``, which reaches cuDNN's fused (flash) attention on GPU in
    bf16/fp16; the probabilities then never exist as an ``[N, N]`` array in memory.
    """
    plain = on_probs is None and logits_fn is None and (dropout is None or not train or dropout.rate == 0.0)
    if plain and jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, scale=scale).astype(v.dtype)
    # Heads first, so that both batched matmuls run on contiguous [N, hd] / [N, N] slices: XLA:CPU
    # runs this 1.3-1.5x faster (forward, and forward + backward) than the [B, N, heads, hd] einsums.
    q, k, v = (t.swapaxes(-3, -2) for t in (q, k, v))
    logits = (jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale).astype(jnp.float32)
    if logits_fn is not None:
        logits = logits_fn(logits)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if on_probs is not None:
        on_probs(attn)
    if dropout is not None:
        attn = dropout(attn, deterministic=not train)
    return jnp.einsum("bhqk,bhkd->bhqd", attn, v).swapaxes(-3, -2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's ViT ``Attention``).

    ``qkv`` output channels are laid out ``(q|k|v, head, channel)``; the scale is
    ``qk_scale or head_dim**-0.5``; heads are concatenated head-major before ``proj``.
    ``torch_init`` initialises ``qkv``/``proj`` like PyTorch's default Linear / 1x1 Conv2d
    (for originals whose projections are 1x1 convs) instead of timm's ViT init.
    With ``sow_probs`` the softmax probabilities are sown as intermediate ``attn_probs``.
    """

    num_heads: int
    qkv_bias: bool = False
    qk_scale: float | None = None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    torch_init: bool = False
    dtype: Dtype = jnp.float32
    sow_probs: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        *lead, n, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"width {c} is not divisible by num_heads={self.num_heads}")
        head_dim = c // self.num_heads

        def linear(features: int, use_bias: bool, name: str) -> nn.Dense:
            if self.torch_init:
                return torch_dense(features, in_features=c, use_bias=use_bias, name=name, dtype=self.dtype)
            return dense(features, use_bias=use_bias, name=name, dtype=self.dtype)

        qkv = linear(3 * c, self.qkv_bias, "qkv")(x)
        q, k, v = split_heads(qkv, 3, self.num_heads)
        scale = self.qk_scale if self.qk_scale is not None else head_dim**-0.5
        recording = self.sow_probs and self.is_mutable_collection("intermediates")
        sow = (lambda p: self.sow("intermediates", "attn_probs", p)) if recording else None
        out = dot_product_attention(q, k, v, scale, nn.Dropout(self.attn_drop), train, sow)
        out = out.reshape(*lead, n, c)
        out = linear(c, True, "proj")(out)
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)


class Block(nn.Module):
    """Pre-norm transformer block (Dosovitskiy et al., 2021, Eq. 2-3)::

        x = x + DropPath(Attn(LN1(x)))
        x = x + DropPath(MLP(LN2(x)))

    The block is the timm ``Block`` the SoT, So-ViT and HVT originals use; ``norm_eps``,
    ``qkv_bias`` and ``mlp_ratio`` are the knobs they differ in.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: float | None = None
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        drop_path = DropPath(self.drop_path)
        y = layer_norm(self.norm_eps, name="norm1", dtype=self.dtype)(x)
        y = Attention(
            self.num_heads,
            self.qkv_bias,
            self.qk_scale,
            self.attn_drop,
            self.drop,
            dtype=self.dtype,
            name="attn",
        )(y, train)
        x = x + drop_path(y, train)
        y = layer_norm(self.norm_eps, name="norm2", dtype=self.dtype)(x)
        y = Mlp(int(c * self.mlp_ratio), drop=self.drop, dtype=self.dtype, name="mlp")(y, train)
        return x + drop_path(y, train)


REMAT_POLICIES = ("none", "block", "dots")


def remat(module: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = (2,)) -> type[nn.Module]:
    """``module`` with its activations rematerialised in the backward pass (Chen et al., 2016).

    ``policy`` is the ``model.remat`` option every family takes:

    * ``'none'``: ``module`` unchanged; every activation is kept for the backward pass.
    * ``'block'``: only the module's inputs are kept, its whole forward is recomputed in the backward
      pass (the least memory: one block's activations live at a time).
    * ``'dots'``: matmul outputs without batch dimensions (the linear layers) are kept and the
      rest (norms, activations, attention probabilities) is recomputed
      (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).

    Parameter names and values are the same under every policy (checkpoints and converters do
    not see it) and so are the gradients, up to float reassociation. ``static_argnums`` counts
    ``self`` as 0: the default marks ``train`` in ``__call__(self, x, train)`` static.
    """
    if policy == "none":
        return module
    if policy == "block":
        return nn.remat(module, static_argnums=static_argnums)
    if policy == "dots":
        return nn.remat(
            module, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable, static_argnums=static_argnums
        )
    raise ValueError(f"remat={policy!r} is not one of: {', '.join(REMAT_POLICIES)}")


class _ScanStep(nn.Module):
    """One step of a scanned :class:`BlockStack`: ``block(**kwargs, drop_path=rate)`` on the carry.

    The block shares this module's scope, so its variables sit directly under the stack's name
    (``blocks/attn/...``, not ``blocks/block/attn/...``), as in the unrolled layout minus the index.
    """

    block: type[nn.Module]
    kwargs: Mapping[str, Any]

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array | None, train: bool) -> tuple[jax.Array, None]:
        # No rates (drop_path_rate 0): a static 0.0, so that DropPath needs no rng, as unrolled.
        block = self.block(**self.kwargs, drop_path=0.0 if rate is None else rate, name="block")
        nn.share_scope(self, block)
        x = block(x, train)
        self.sow("intermediates", "out", x)
        return x, None


class BlockStack(nn.Module):
    """``depth`` identical blocks ``x = block_i(x, train)`` in sequence, unrolled or scanned.

    ``block(**block_kwargs, drop_path=rate_i)`` is built once per block and wrapped with :func:`remat`
    (``remat`` policy; the block's ``__call__(x, train)`` with ``train`` static). ``drop_path_rate`` is
    either the stochastic-depth rate of the last block (rates rising linearly from 0,
    :func:`drop_path_rates`) or the sequence of every block's rate (a run cut from a longer schedule).

    The stack shares its parent's scope, so the layouts below are the parent's own entries
    (``start`` is the index of the stack's first block among the parent's blocks):

    * ``scan=False``: blocks ``blocks_<start> .. blocks_<start + depth - 1>``, each sowing intermediate
      ``blocks_<i>/out``; the compiled program holds ``depth`` copies of the block, each block's input
      behind a :func:`gradient_barrier` (the backward stores the residual gradient between blocks).
    * ``scan=True``: one ``flax.linen.scan`` over the blocks. Every collection of the block has one
      entry whose leaves carry a leading ``depth`` axis (leaf ``i`` along it is block ``start + i``'s):
      ``blocks``, or ``blocks_<first>-<last>`` when the stack is a ``segment``, a run of the parent's
      blocks whose neighbours differ (:func:`jvit.convert.layout.segment_key`). The per-block drop-path
      rates are a scanned input (a traced scalar in :class:`DropPath`), ``params`` and ``dropout``
      rngs are split per block, and the intermediate ``out`` is stacked ``[depth, B, ...]``. The block
      is traced and compiled once whatever ``depth`` (compile time independent of depth); remat, if
      any, applies inside the scan body, per block.

    :mod:`jvit.convert.layout` converts variables between the two layouts; the outputs agree up to
    float reassociation (and, in training, the random draws of dropout and drop-path differ).

    Attach in the parent's ``setup`` under a name other than ``blocks`` / ``blocks_<i>``::

        self.stack = BlockStack(
            block=Block, depth=12, block_kwargs=dict(num_heads=6, ...), drop_path_rate=0.1, scan=True, remat="dots"
        )
    """

    block: type[nn.Module]
    depth: int
    block_kwargs: Mapping[str, Any]
    drop_path_rate: float | Sequence[float] = 0.0
    scan: bool = False
    remat: str = "none"
    start: int = 0
    segment: bool = False

    @property
    def rates(self) -> list[float]:
        """Every block's stochastic-depth rate."""
        if isinstance(self.drop_path_rate, (int, float)):
            return drop_path_rates(float(self.drop_path_rate), self.depth)
        if len(self.drop_path_rate) != self.depth:
            raise ValueError(f"BlockStack: {len(self.drop_path_rate)} drop-path rates for {self.depth} blocks")
        return [float(r) for r in self.drop_path_rate]

    def setup(self):
        # The blocks are the parent's children by name (checkpoint and converter paths do not see the stack).
        nn.share_scope(self.parent, self)
        block = remat(self.block, self.remat)
        if self.scan:
            step = nn.scan(
                _ScanStep,
                variable_axes={True: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast),
                length=self.depth,
            )
            name = f"blocks_{self.start}-{self.start + self.depth - 1}" if self.segment else "blocks"
            self.scanned = step(block, self.block_kwargs, name=name)
        else:
            self.unrolled = [
                block(**self.block_kwargs, drop_path=rate, name=f"blocks_{self.start + i}")
                for i, rate in enumerate(self.rates)
            ]

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.scan:
            rates = self.rates
            return self.scanned(x, jnp.asarray(rates, jnp.float32) if any(rates) else None, train)[0]
        for block in self.unrolled:
            x = block(gradient_barrier(x), train)
            block.sow("intermediates", "out", x)
        return x


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """The fixed sinusoid position table of Vaswani et al. (2017, Sec. 3.5), ``[1, P, dim]``.

    ``angle(p, j) = p / 10000**(2*floor(j/2)/dim)``; even columns take ``sin``, odd ``cos``.
    Computed in float64 and stored as float32, like the originals.
    """
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)[None, :]
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return table[None].astype(np.float32)


def tokens_from_map(x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` feature map to ``[B, H*W, C]`` tokens in row-major order (torch's ``flatten(2)``)."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


def check_image(x: jax.Array, img_size: int | tuple[int, int] | None, model: str) -> None:
    """Fail early, naming the problem, on input that is not a float NHWC RGB batch of the right size."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"{model} expects float NHWC images [batch, height, width, 3]; got shape {tuple(x.shape)}"
            + (" (NCHW? transpose with x.transpose(0, 2, 3, 1))" if x.ndim == 4 and x.shape[1] == 3 else "")
        )
    if img_size is not None and tuple(x.shape[1:3]) != _pair(img_size):
        raise ValueError(
            f"{model} was built for {_pair(img_size)} inputs but got {tuple(x.shape[1:3])}; "
            "create the model with img_size= the input size (where the family supports it)"
        )
