"""HVT-S-1 (C=384, 6 heads, one pooling after block 0: 196 -> 97 tokens) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/hvt_s_1.py --workdir runs/hvt_s_1
    python -m jvit.main --config configs/hvt_s_1.py:mock --workdir /tmp/hvt_s_1_mock   # no dataset needed

Recipe: :func:`jvit.recipes.hvt_recipe` (batch 1024, AdamW lr 1e-3, wd 0.025 without pos_embeds,
300 epochs warmup + cosine, drop path 0.1, repeated augmentation, no EMA). DeiT augmentation (timm, see
recipes.deit_augment).

Original result (Pan et al., ICCV 2021): 78.00 / 93.83 top-1 / top-5; 2.40 GFLOPs, 22.09M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.hvt_recipe("hvt_s_1"), arg)
