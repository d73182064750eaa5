"""Conversion rules for DeiT checkpoints (the facebookresearch/deit releases, ``{'model': state_dict}``).

jvit's DeiT mirrors timm's ``VisionTransformer`` names (``patch_embed.proj``, ``blocks.<i>.attn.qkv``,
``cls_token``, ``dist_token``, ``pos_embed``, ``norm``, ``head``, ``head_dist``), so the generic
mapping is the whole conversion; the strict checks reject a distilled file for a plain variant
(``dist_token``, ``head_dist`` unexpected, ``pos_embed`` one longer) and the other way round.

``deit_*_sot`` variants (family ``deit_sot``) load the plain DeiT release into the backbone; DeiT's
classifier ``head`` reads the final-norm class token exactly as SoT's ``cls_fc`` does, so it becomes
``classifier.cls_fc``; the second-order branch (``classifier/pooling``, ``classifier/visual_fc``) has
no released weights and is initialised fresh (the conversion report says so).
"""

from jvit.convert.core import ConversionRules

RULES = ConversionRules(family="deit", head_key="head.weight")

SOT_RULES = ConversionRules(
    family="deit_sot",
    head_key="head.weight",
    renames=((r"^head\.", "classifier.cls_fc."),),
    fresh=(
        (
            r"^params/classifier/(pooling|visual_fc)/",
            "SoT's second-order branch (MGCrP + svPN, visual_fc): no released weights",
        ),
    ),
)
