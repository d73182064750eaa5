"""SP-ViT-S fine-tuned from 224 to 384 px on ImageNet-1k, the original's fine-tune script.

    python -m jvit.main --config configs/spvit_s_384.py --workdir runs/spvit_s_384 \
        --config.init_from=CONVERTED_224_DIR_OR_224.pth
    python -m jvit.main --config configs/spvit_s_384.py:mock --workdir /tmp/spvit_s_384_mock
    # (no dataset needed)

Recipe: :func:`jvit.recipes.spvit_384_recipe` with global batch 256, drop path 0.1, no EMA, from the non-EMA
224 weights (lr 5e-6 after 5 warmup epochs from 1e-6, min_lr 5e-6, wd 1e-8, MixToken and token labeling on the
24 x 24 grid). The 224 ``pos_embed`` is resized bicubically as the original's loader does; from a ``.pth`` the
weights read are the ones the script fine-tuned from (the 384 pretrained cfg's ``weights_keys``).

Original result (README): 85.1% top-1 on ImageNet-1k val at 384px.
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.spvit_384_recipe("spvit_s", batch_size=256, drop_path=0.1), arg)
