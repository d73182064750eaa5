"""STViT-S (SViT-S: widths 64/128/320/512, depths 3/5/9/3, super tokens over 8x8 / 4x4 regions then global
attention) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/stvit_small.py --workdir runs/stvit_small
    python -m jvit.main --config configs/stvit_small.py:mock --workdir /tmp/stvit_small_mock   # no dataset needed

Recipe: :func:`jvit.recipes.stvit_recipe` (batch 1024, AdamW lr 5e-4 per 512, wd 0.05 with the layer
scales decayed, 300 epochs warmup + cosine, EMA 0.99996, repeated augmentation) with drop path 0.1
(README's 0.1 (its run.sh uses 0.3)). DeiT augmentation (timm, see recipes.deit_augment). The 384 px
models are a 30-epoch fine-tune of this one (stvit.md section 7): configs/stvit_small_384.py.

Original result (Huang et al., "Vision Transformer with Super Token Sampling", CVPR 2023):
83.6% top-1 on ImageNet-1k val at 224px (raw weights, not EMA); 25.5M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.stvit_recipe("stvit_small", drop_path=0.1), arg)
