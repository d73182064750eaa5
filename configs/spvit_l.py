"""SP-ViT-L (C=768, depth 24, no SP-SA block in the released code, class token before block 22) on ImageNet-1k at
224px, the original recipe.

    python -m jvit.main --config configs/spvit_l.py --workdir runs/spvit_l
    python -m jvit.main --config configs/spvit_l.py:mock --workdir /tmp/spvit_l_mock   # no dataset needed

Recipe: :func:`jvit.recipes.spvit_recipe` with global batch 800, AdamW lr 0.0006, drop path 0.3,
RandAugment rand-n3-m9-mstd0.5-inc1 (wd 0.05, 300 epochs warmup + cosine + 10 cooldown, EMA 0.99992,
MixToken, token labeling). Dense teacher token labels: --config.input.token_label_dir=DIR;
without it every token gets the image label.

Original result (README): 85.5% top-1 on ImageNet-1k val at 224px (EMA weights, fused cls + token
score); 150.2M params.
"""

from jvit import recipes


def get_config(arg=None):
    c = recipes.spvit_recipe(
        "spvit_l", batch_size=800, lr=0.0006, drop_path=0.3, rand_augment="rand-n3-m9-mstd0.5-inc1"
    )
    return recipes.finish(c, arg)
