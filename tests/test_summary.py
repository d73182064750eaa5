"""``jvit summary``: parameter counts, XLA FLOPs and train-mode activation memory."""

from __future__ import annotations

import pytest

import jvit
from jvit import summary

TINY = {"patch_size": 4, "num_heads": 2, "head_dim": 8, "num_blocks": 2, "pool_block_width": 1}


def test_summary_of_a_tiny_model():
    model = jvit.create_model("hvt_ti_1", num_classes=5, img_size=16, **TINY)
    figures = summary.summarize(model)
    variables = jvit.init_variables(model)
    assert figures["params_trainable"] == jvit.count_params(variables["params"])
    assert sum(figures["params_per_module"].values()) == figures["params_trainable"]
    assert list(figures["params_per_module"])[:2] == ["blocks_0", "blocks_1"]
    assert figures["params_per_module"]["head"] == 16 * 5 + 5  # Dense(16 -> 5)
    # 4x4 patch embedding alone: 16 tokens x (4*4*3 -> 16) multiply-adds.
    assert figures["gmacs_per_image"] * 1e9 > 16 * 48 * 16
    assert figures["activation_bytes_per_image"] > 0


def test_a_scanned_model_counts_every_block():
    """XLA counts a loop body once; the summary of a scanned stack counts the FLOPs of all its blocks."""
    kw = dict(TINY, num_blocks=4, pool_block_width=0)
    unrolled = summary.summarize(jvit.create_model("hvt_ti_1", num_classes=5, img_size=16, **kw))
    scanned = summary.summarize(jvit.create_model("hvt_ti_1", num_classes=5, img_size=16, scan_blocks=True, **kw))
    assert scanned["flops_per_image"] == unrolled["flops_per_image"]
    assert scanned["params_trainable"] == unrolled["params_trainable"]
    # Its activation memory is its own scanned train step's.
    assert scanned["activation_bytes_per_image"] > 0


@pytest.mark.slow
def test_hvt_ti_1_matches_the_spec():
    """/work/shared/specs/hvt.md: 5,735,656 parameters, 0.642 GMACs (analytic), paper 0.64 G."""
    figures = summary.summarize(jvit.create_model("hvt_ti_1"))
    assert figures["params_total"] == 5_735_656
    assert figures["gmacs_per_image"] == pytest.approx(0.642, rel=0.02)


def test_summary_cli_unknown_model(capsys):
    assert summary.main(["hvt_tiny_typo"]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_summary_of_a_model_whose_train_output_is_a_tuple():
    """SP-ViT trains on (class logits, aux logits) for token labeling: the activation figure covers both."""
    kw = dict(img_size=32, embed_dim=16, depth=2, num_heads=2, stem_width=8, spsa_blocks=(0,), cls_insert_block=1)
    figures = summary.summarize(jvit.create_model("spvit_s", num_classes=5, **kw))
    assert figures["activation_bytes_per_image"] > 0 and figures["flops_per_image"] > 0
