"""So-ViT-7 (ResNet token embedding, C=256, depth 7, cross-covariance head 48x24) on ImageNet-1k at 224px, the
original recipe.

    python -m jvit.main --config configs/sovit_7.py --workdir runs/sovit_7
    python -m jvit.main --config configs/sovit_7.py:mock --workdir /tmp/sovit_7_mock   # no dataset needed

Recipe: :func:`jvit.recipes.sot_recipe` with global batch 512, AdamW lr 0.001 and weight decay 0.03 (300
epochs warmup + cosine + 10 cooldown, drop path 0.1, EMA 0.99996). DeiT augmentation (timm, see recipes.deit_augment).

Original result: 76.2% top-1 (paper), 76.8% (repository 'upgrade'); 5.5M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_recipe("sovit_7", batch_size=512, lr=0.001, weight_decay=0.03), arg)
