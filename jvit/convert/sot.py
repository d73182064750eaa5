"""Conversion rules for SoT and So-ViT checkpoints (timm ``CheckpointSaver`` files).

Released files hold ``state_dict`` and ``state_dict_ema``; the original's eval loads the EMA
weights, so that is the default (see ``PretrainedCfg.weights_keys`` of the variants).
"""

from jvit.convert.core import ConversionRules

RULES = ConversionRules(
    family="sot",
    head_key="classifier.cls_fc.weight",
    renames=(
        (r"^visual_tokens\.tokens\.", "visual_tokens."),
        (r"\.stem\.0\.", ".stem."),
        (r"\.downsample\.0\.", ".downsample_conv."),
        (r"\.downsample\.1\.", ".downsample_bn."),
        # SoT's MGCrP: projection + svPN start vector.
        (r"^classifier\.representation\.wr\.", "classifier.pooling.wr."),
        (r"^classifier\.representation\.norm\.weight$", "classifier.pooling.svpn.weight"),
        # So-ViT's cross-covariance: conv_dr_block.{0: q, 1: k}.{0: conv, 1: BN}; svPN start vector.
        (r"^classifier\.representation\.conv_dr_block\.0\.0\.", "classifier.pooling.reduce_q.proj."),
        (r"^classifier\.representation\.conv_dr_block\.0\.1\.", "classifier.pooling.reduce_q.bn."),
        (r"^classifier\.representation\.conv_dr_block\.1\.0\.", "classifier.pooling.reduce_k.proj."),
        (r"^classifier\.representation\.conv_dr_block\.1\.1\.", "classifier.pooling.reduce_k.bn."),
        (r"^classifier\.normalization\.weight$", "classifier.pooling.svpn.weight"),
    ),
)
