"""SP-ViT-M (C=512, depth 20, SP-SA in blocks 0-9, class token before block 10) on ImageNet-1k at 224px, the
original recipe.

    python -m jvit.main --config configs/spvit_m.py --workdir runs/spvit_m
    python -m jvit.main --config configs/spvit_m.py:mock --workdir /tmp/spvit_m_mock   # no dataset needed

Recipe: :func:`jvit.recipes.spvit_recipe` with global batch 1024, AdamW lr 0.0016, drop path 0.2 (wd
0.05, 300 epochs warmup + cosine + 10 cooldown, EMA 0.99992, MixToken, token labeling).
Dense teacher token labels: --config.input.token_label_dir=DIR; without it every token gets the
image label.

Original result (README): 84.9% top-1 on ImageNet-1k val at 224px (EMA weights, fused cls + token
score); 56.0M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.spvit_recipe("spvit_m", batch_size=1024, lr=0.0016, drop_path=0.2), arg)
