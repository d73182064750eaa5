"""So-ViT-19 (C=448, depth 19, cross-covariance 96x48, head dropout 0.5) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/sovit_19.py --workdir runs/sovit_19
    python -m jvit.main --config configs/sovit_19.py:mock --workdir /tmp/sovit_19_mock   # no dataset needed

Recipe: :func:`jvit.recipes.sot_recipe` with global batch 512, AdamW lr 0.001 and weight decay 0.05 (300
epochs warmup + cosine + 10 cooldown, drop path 0.1, EMA 0.99996). DeiT augmentation (timm, see recipes.deit_augment).

Original result: 82.4% top-1 (paper), 82.8% (upgrade); 43.8M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_recipe("sovit_19", batch_size=512, lr=0.001, weight_decay=0.05), arg)
