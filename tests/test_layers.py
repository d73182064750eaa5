"""Shared layers: global attention goes through ``jax.nn.dot_product_attention`` (cuDNN flash attention
on GPU) and gives what the explicit softmax path gives."""

from __future__ import annotations

import jax
import numpy as np

from jvit.models import layers


def test_attention_uses_jax_dot_product_attention_unless_probs_are_needed(monkeypatch):
    calls = []
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    attn = layers.Attention(num_heads=4, qkv_bias=True, sow_probs=True)
    x = jax.random.normal(jax.random.key(0), (2, 17, 32))
    variables = attn.init(jax.random.key(1), x)
    calls.clear()
    out = attn.apply(variables, x)
    assert calls == [1]
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
