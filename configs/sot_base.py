"""SoT-Base (C=528, depth 24, MGCrP 6x38, head dropout 0.7) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/sot_base.py --workdir runs/sot_base
    python -m jvit.main --config configs/sot_base.py:mock --workdir /tmp/sot_base_mock   # no dataset needed

Recipe: :func:`jvit.recipes.sot_recipe` with global batch 512, AdamW lr 0.0005 and weight decay 0.065
(300 epochs warmup + cosine + 10 cooldown, drop path 0.1, EMA 0.99996). DeiT augmentation (timm, see
recipes.deit_augment).

Original result: 83.5% top-1, 34.6% on ImageNet-A; 76.8M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_recipe("sot_base", batch_size=512, lr=0.0005, weight_decay=0.065), arg)
