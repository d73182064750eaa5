"""HVT-S-3 (C=384, 6 heads, pooling after blocks 0, 4, 8: 196 -> 97 -> 48 -> 23) on ImageNet-1k at 224px, the
original recipe.

    python -m jvit.main --config configs/hvt_s_3.py --workdir runs/hvt_s_3
    python -m jvit.main --config configs/hvt_s_3.py:mock --workdir /tmp/hvt_s_3_mock   # no dataset needed

Recipe: :func:`jvit.recipes.hvt_recipe` (batch 1024, AdamW lr 1e-3, wd 0.025 without pos_embeds,
300 epochs warmup + cosine, drop path 0.1, repeated augmentation, no EMA). DeiT augmentation (timm, see
recipes.deit_augment).

Original result (Pan et al., ICCV 2021): 76.32 / 92.90 top-1 / top-5; 1.62 GFLOPs, 22.11M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.hvt_recipe("hvt_s_3"), arg)
