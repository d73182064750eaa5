"""SoT-Small (C=384, depth 14, MGCrP 6x24, head dropout 0.5) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/sot_small.py --workdir runs/sot_small
    python -m jvit.main --config configs/sot_small.py:mock --workdir /tmp/sot_small_mock   # no dataset needed

Recipe: :func:`jvit.recipes.sot_recipe` with global batch 1024, AdamW lr 0.001 and weight decay 0.03
(300 epochs warmup + cosine + 10 cooldown, drop path 0.1, EMA 0.99996). DeiT augmentation (timm, see
recipes.deit_augment).

Original result: 82.7% top-1, 31.8% on ImageNet-A; 27.0M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_recipe("sot_small", batch_size=1024, lr=0.001, weight_decay=0.03), arg)
