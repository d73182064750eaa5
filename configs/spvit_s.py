"""SP-ViT-S (C=384, depth 16, SP-SA in blocks 0-13, class token before block 14) on ImageNet-1k at 224px, the
original recipe.

    python -m jvit.main --config configs/spvit_s.py --workdir runs/spvit_s
    python -m jvit.main --config configs/spvit_s.py:mock --workdir /tmp/spvit_s_mock   # no dataset needed

Recipe: :func:`jvit.recipes.spvit_recipe` with global batch 1024, AdamW lr 0.0016, drop path 0.1 (wd
0.05, 300 epochs warmup + cosine + 10 cooldown, EMA 0.99992, MixToken, token labeling).
Dense teacher token labels: --config.input.token_label_dir=DIR; without it every token gets the
image label.

Original result (README): 83.9% top-1 on ImageNet-1k val at 224px (EMA weights, fused cls + token
score); 26.2M params.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.spvit_recipe("spvit_s", batch_size=1024, lr=0.0016, drop_path=0.1), arg)
