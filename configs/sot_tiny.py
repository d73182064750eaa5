"""SoT-Tiny (DenseNet token embedding, C=240, depth 12, MGCrP head 6x14) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/sot_tiny.py --workdir runs/sot_tiny
    python -m jvit.main --config configs/sot_tiny.py:mock --workdir /tmp/sot_tiny_mock   # no dataset needed

Recipe: :func:`jvit.recipes.sot_recipe` with global batch 1024, AdamW lr 0.001 and weight decay 0.03
(300 epochs warmup + cosine + 10 cooldown, drop path 0.1, EMA 0.99996). DeiT augmentation (timm, see
recipes.deit_augment).

Original result: 80.3% top-1 on ImageNet-1k val (224px), 21.5% on ImageNet-A; 7.98M trainable params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_recipe("sot_tiny", batch_size=1024, lr=0.001, weight_decay=0.03), arg)
