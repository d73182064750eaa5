"""SoT's second-order head on the released DeiT-Small backbone (deit_small_sot), fine-tuned on ImageNet-1k at 224px.

    curl -LO https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth
    python -m jvit.main --config configs/deit_small_sot.py --workdir runs/deit_small_sot
    python -m jvit.main --config configs/deit_small_sot.py:folder:/data/flowers --workdir runs/deit_small_sot_flowers

Recipe: :func:`jvit.recipes.sot_finetune_recipe` (30 epochs, batch 1024, AdamW lr 1e-4, wd 0.05, drop path
0.1 as the backbone was trained, no EMA), starting from ``deit_small_patch16_224-cd65a155.pth``
(``--config.init_from=PATH`` if it lies elsewhere): backbone loaded strictly, SoT head initialised fresh.

Backbone alone: DeiT-Small 79.8% top-1. Parameters: 25.62M (README DeiT-S+ours 26.9M; 82.7% top-1 trained from scratch).
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_finetune_recipe("deit_small_sot", drop_path=0.1), arg)
