"""SoT's second-order head on the released Swin-B backbone (swin_base_sot), fine-tuned on ImageNet-1k at 224px.

    curl -LO https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_base_patch4_window7_224.pth
    python -m jvit.main --config configs/swin_base_sot.py --workdir runs/swin_base_sot
    python -m jvit.main --config configs/swin_base_sot.py:folder:/data/flowers --workdir runs/swin_base_sot_flowers

Recipe: :func:`jvit.recipes.sot_finetune_recipe` (30 epochs, batch 1024, AdamW lr 1e-4, wd 0.05, drop path
0.5 as the backbone was trained, no EMA), starting from ``swin_base_patch4_window7_224.pth``
(``--config.init_from=PATH`` if it lies elsewhere): backbone loaded strictly, SoT head initialised fresh.

Backbone alone: Swin-B 83.5% top-1. Parameters: 95.88M (README Swin-B+ours 95.9M; 84.0% top-1 trained from scratch).
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.sot_finetune_recipe("swin_base_sot", drop_path=0.5), arg)
