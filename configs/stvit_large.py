"""STViT-L (SViT-L: widths 96/192/448/640, depths 4/7/19/8, super tokens over 8x8 / 4x4 regions then global
attention, layer scale in stages 3-4) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/stvit_large.py --workdir runs/stvit_large
    python -m jvit.main --config configs/stvit_large.py:mock --workdir /tmp/stvit_large_mock   # no dataset needed

Recipe: :func:`jvit.recipes.stvit_recipe` (batch 1024, AdamW lr 5e-4 per 512, wd 0.05 with the layer
scales decayed, 300 epochs warmup + cosine, EMA 0.99996, repeated augmentation) with drop path 0.6 (the
README notes 0.4 for the first 260 epochs then 0.6 trains better). DeiT augmentation (timm, see
recipes.deit_augment). The 384 px models are a 30-epoch fine-tune of this one (stvit.md section 7):
configs/stvit_large_384.py.

Original result (Huang et al., "Vision Transformer with Super Token Sampling", CVPR 2023):
85.3% top-1 on ImageNet-1k val at 224px (raw weights, not EMA); 95.0M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.stvit_recipe("stvit_large", drop_path=0.6), arg)
