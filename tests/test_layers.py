"""Shared layers: global attention goes through ``jax.nn.dot_product_attention`` (cuDNN flash attention
on GPU) off CPU and gives what the explicit softmax path gives; max pooling's gradient follows PyTorch's; an unrolled
block stack's compiled backward stays linear in depth (gradient barriers); non-overlapping convolutions run as matmuls
equal to the convolution."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jvit.models import layers


def test_attention_uses_jax_dot_product_attention_off_cpu_unless_probs_are_needed(monkeypatch):
    calls = []
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    attn = layers.Attention(num_heads=4, qkv_bias=True, sow_probs=True)
    x = jax.random.normal(jax.random.key(0), (2, 17, 32))
    variables = attn.init(jax.random.key(1), x)
    # On CPU the heads-first einsums run (faster on XLA:CPU).
    calls.clear()
    on_cpu = attn.apply(variables, x)
    assert calls == []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    out = attn.apply(variables, x)
    assert calls == [1]
    np.testing.assert_allclose(out, on_cpu, rtol=1e-5, atol=1e-6)
    # Recording the probabilities (an intermediate) takes the explicit softmax path: same numbers.
    explicit, state = attn.apply(variables, x, mutable=["intermediates"])
    assert calls == [1]
    np.testing.assert_allclose(out, explicit, rtol=1e-5, atol=1e-6)
    probs = state["intermediates"]["attn_probs"][0]
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    # Attention dropout in training needs the probabilities too.
    dropped = layers.Attention(num_heads=4, attn_drop=0.5)
    v = dropped.init(jax.random.key(1), x)
    calls.clear()
    dropped.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert calls == []
    dropped.apply(v, x, train=False)
    assert calls == [1]


@pytest.mark.parametrize(
    "shape, window, stride, padding",
    [((2, 9, 9, 3), 3, 2, 1), ((2, 8, 10, 3), 3, 2, 1), ((1, 7, 7, 2), 2, 2, 0), ((1, 6, 5, 2), 3, 1, 1)],
)
def test_max_pool_gradient_goes_to_the_first_maximum_as_in_torch(shape, window, stride, padding):
    # Small integers make ties common: the gradient must go where PyTorch's kernel sends it.
    x = np.random.default_rng(0).integers(0, 3, shape).astype(np.float32)
    y = np.asarray(layers.max_pool_2d(jnp.asarray(x), window, stride, padding))
    g = np.random.default_rng(1).normal(size=y.shape).astype(np.float32)
    loss = lambda x: jnp.sum(layers.max_pool_2d(x, window, stride, padding) * g)  # noqa: E731
    dx = jax.grad(loss)(jnp.asarray(x))
    # Compiled as the trainer compiles it (barriers kept): the same gradient.
    jitted = jax.jit(jax.grad(loss), compiler_options=layers.barrier_compiler_options())(jnp.asarray(x))
    np.testing.assert_array_equal(jitted, dx)
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, window, stride, padding)
    yt.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(y, yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def _unrolled_stack_grad(depth: int, compiler_options: dict | None):
    """The jitted parameter gradient of a depth-``depth`` unrolled BlockStack of ViT blocks (with
    drop path) on ``[2, 5, 16]`` tokens, compiled with ``compiler_options``: (grads, optimized HLO)."""

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            stack = layers.BlockStack(layers.Block, depth, dict(num_heads=2), drop_path_rate=0.2)
            return jnp.sum(stack(x, train) ** 2)

    model, x = Stack(), jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)["params"]
    grad = jax.jit(
        jax.grad(lambda p: model.apply({"params": p}, x, rngs={"dropout": jax.random.key(3)})),
        compiler_options=compiler_options,
    )
    compiled = grad.lower(params).compile()
    return compiled(params), compiled.as_text()


def _max_fusion_operands(hlo: str) -> int:
    return max(len(args.split(",")) for args in re.findall(r"^\s*%\S+ = \S+ fusion\((.*?)\), kind", hlo, re.M))


def test_gradient_barrier_keeps_an_unrolled_stacks_backward_linear_in_depth():
    # Without stored residual gradients XLA:CPU fused the whole chain of later blocks' backward into
    # each block's gradient kernels: the largest fusion grew with depth (SP-ViT-S: 10x slower steps).
    options = layers.barrier_compiler_options()
    (_, shallow), (grads, deep) = _unrolled_stack_grad(4, options), _unrolled_stack_grad(8, options)
    assert "opt-barrier" in deep
    assert _max_fusion_operands(deep) == _max_fusion_operands(shallow)
    # The barrier changes what is stored, not what is computed (up to the float reassociation of
    # differently fused sums).
    plain, _ = _unrolled_stack_grad(8, None)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kernel", "stride", "hw"),
    [(1, 1, (7, 6)), (1, 2, (7, 6)), (4, 4, (18, 19)), (16, 16, (32, 32))],
    ids=["pointwise", "pointwise-strided", "patches-cropped", "patch16"],
)
def test_non_overlapping_convolutions_run_as_matmuls_equal_to_the_convolution(kernel, stride, hw):
    """``conv2d`` computes 1x1 and stride == kernel convolutions as matmuls (:class:`MatmulConv`): same
    parameters as ``nn.Conv``, same outputs and gradients (input and kernel), floor mode included."""
    conv = layers.conv2d(5, kernel, in_features=3, stride=stride, name="c")
    assert isinstance(conv, layers.MatmulConv)
    ref = nn.Conv(5, (kernel, kernel), strides=(stride, stride), padding="VALID")
    x = jax.random.normal(jax.random.key(0), (2, *hw, 3))
    variables = conv.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref.init(jax.random.key(1), x))
    gy = jax.random.normal(jax.random.key(2), ref.apply(variables, x).shape)

    def grads(module):
        return jax.grad(lambda v, x: jnp.sum(module.apply(v, x) * gy), argnums=(0, 1))(variables, x)

    np.testing.assert_allclose(conv.apply(variables, x), ref.apply(variables, x), atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads(conv)), jax.tree.leaves(grads(ref))):
        np.testing.assert_allclose(got, want, atol=1e-4)
