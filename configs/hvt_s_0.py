"""HVT-S-0 (C=384, 6 heads, no pooling: the DeiT-S-like baseline) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/hvt_s_0.py --workdir runs/hvt_s_0
    python -m jvit.main --config configs/hvt_s_0.py:mock --workdir /tmp/hvt_s_0_mock   # no dataset needed

Recipe: :func:`jvit.recipes.hvt_recipe` (batch 1024, AdamW lr 1e-3, wd 0.025 without pos_embeds,
300 epochs warmup + cosine, drop path 0.1, repeated augmentation, no EMA). DeiT augmentation (timm, see
recipes.deit_augment).

Original result (Pan et al., ICCV 2021): 80.39 / 95.13 top-1 / top-5; 4.57 GFLOPs, 22.05M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.hvt_recipe("hvt_s_0"), arg)
