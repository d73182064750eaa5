"""SoT's second-order head on the released DeiT-Base backbone (deit_base_sot), fine-tuned on ImageNet-1k at 224px.

    curl -LO https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth
    python -m jvit.main --config configs/deit_base_sot.py --workdir runs/deit_base_sot
    python -m jvit.main --config configs/deit_base_sot.py:folder:/data/flowers --workdir runs/deit_base_sot_flowers

Recipe: :func:`jvit.recipes.sot_finetune_recipe` (30 epochs, batch 1024, AdamW lr 1e-4, wd 0.05, drop path
0.1 as the backbone was trained, no EMA), starting from ``deit_base_patch16_224-b5f2ef4d.pth``
(``--config.init_from=PATH`` if it lies elsewhere): backbone loaded strictly, SoT head initialised fresh.

Backbone alone: DeiT-Base 81.8% top-1. Parameters: 95.58M (README DeiT-B+ours 94.9M; 82.9% top-1 trained from scratch).
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_finetune_recipe("deit_base_sot", drop_path=0.1), arg)
