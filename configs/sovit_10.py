"""So-ViT-10 (C=256, depth 10, cross-covariance 48x24) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/sovit_10.py --workdir runs/sovit_10
    python -m jvit.main --config configs/sovit_10.py:mock --workdir /tmp/sovit_10_mock   # no dataset needed

Recipe: :func:`jvit.recipes.sot_recipe` with global batch 512, AdamW lr 0.001 and weight decay 0.03 (300
epochs warmup + cosine + 10 cooldown, drop path 0.1, EMA 0.99996). DeiT augmentation (timm, see recipes.deit_augment).

Original result: 77.9% top-1 (paper), 78.7% (upgrade); 7.1M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_recipe("sovit_10", batch_size=512, lr=0.001, weight_decay=0.03), arg)
