"""SoT's second-order head on the released Swin-T backbone (swin_tiny_sot), fine-tuned on ImageNet-1k at 224px.

    curl -LO https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth
    python -m jvit.main --config configs/swin_tiny_sot.py --workdir runs/swin_tiny_sot
    python -m jvit.main --config configs/swin_tiny_sot.py:folder:/data/flowers --workdir runs/swin_tiny_sot_flowers

Recipe: :func:`jvit.recipes.sot_finetune_recipe` (30 epochs, batch 1024, AdamW lr 1e-4, wd 0.05, drop path
0.2 as the backbone was trained, no EMA), starting from ``swin_tiny_patch4_window7_224.pth``
(``--config.init_from=PATH`` if it lies elsewhere): backbone loaded strictly, SoT head initialised fresh.

Backbone alone: Swin-T 81.2% top-1. Parameters: 31.20M (README Swin-T+ours 31.6M; 83.0% top-1 trained from scratch).
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_finetune_recipe("swin_tiny_sot", drop_path=0.2), arg)
