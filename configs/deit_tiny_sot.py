"""SoT's second-order head on the released DeiT-Tiny backbone (deit_tiny_sot), fine-tuned on ImageNet-1k at 224px.

    curl -LO https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth
    python -m jvit.main --config configs/deit_tiny_sot.py --workdir runs/deit_tiny_sot
    python -m jvit.main --config configs/deit_tiny_sot.py:folder:/data/flowers --workdir runs/deit_tiny_sot_flowers

Recipe: :func:`jvit.recipes.sot_finetune_recipe` (30 epochs, batch 1024, AdamW lr 1e-4, wd 0.05, drop path
0.1 as the backbone was trained, no EMA), starting from ``deit_tiny_patch16_224-a1311bcf.pth``
(``--config.init_from=PATH`` if it lies elsewhere): backbone loaded strictly, SoT head initialised fresh.

Backbone alone: DeiT-Tiny 72.2% top-1. Parameters: 6.93M (README DeiT-T+ours 7.0M; 78.6% top-1 trained from scratch).
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_finetune_recipe("deit_tiny_sot", drop_path=0.1), arg)
