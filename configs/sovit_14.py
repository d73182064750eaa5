"""So-ViT-14 (C=384, depth 14, cross-covariance 64x48, head dropout 0.5) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/sovit_14.py --workdir runs/sovit_14
    python -m jvit.main --config configs/sovit_14.py:mock --workdir /tmp/sovit_14_mock   # no dataset needed

Recipe: :func:`jvit.recipes.sot_recipe` with global batch 512, AdamW lr 0.001 and weight decay 0.05 (300
epochs warmup + cosine + 10 cooldown, drop path 0.1, EMA 0.99996). DeiT augmentation (timm, see recipes.deit_augment).

Original result: 81.8% top-1 (paper), 82.3% (upgrade); 24.6M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_recipe("sovit_14", batch_size=512, lr=0.001, weight_decay=0.05), arg)
