"""STViT-B (SViT-B: widths 96/192/384/512, depths 4/6/14/6, super tokens over 8x8 / 4x4 regions then global
attention, layer scale in stages 3-4) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/stvit_base.py --workdir runs/stvit_base
    python -m jvit.main --config configs/stvit_base.py:mock --workdir /tmp/stvit_base_mock   # no dataset needed

Recipe: :func:`jvit.recipes.stvit_recipe` (batch 1024, AdamW lr 5e-4 per 512, wd 0.05 with the layer
scales decayed, 300 epochs warmup + cosine, EMA 0.99996, repeated augmentation) with drop path 0.4. DeiT
augmentation (timm, see recipes.deit_augment). The 384 px models are a 30-epoch fine-tune of this one
(stvit.md section 7): configs/stvit_base_384.py.

Original result (Huang et al., "Vision Transformer with Super Token Sampling", CVPR 2023):
84.8% top-1 on ImageNet-1k val at 224px (raw weights, not EMA); 51.7M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.stvit_recipe("stvit_base", drop_path=0.4), arg)
