"""SP-ViT-L fine-tuned from 224 to 384 px on ImageNet-1k, the original's fine-tune script.

    python -m jvit.main --config configs/spvit_l_384.py --workdir runs/spvit_l_384 \
        --config.init_from=CONVERTED_224_DIR_OR_224.pth
    python -m jvit.main --config configs/spvit_l_384.py:mock --workdir /tmp/spvit_l_384_mock
    # (no dataset needed)

Recipe: :func:`jvit.recipes.spvit_384_recipe` with global batch 512 (16 x 8 per step, 4 steps accumulated),
drop path 0.3, RandAugment rand-n3-m9-mstd0.5-inc1, EMA 0.99992 from the 224 EMA weights (lr 5e-6 after 5
warmup epochs from 1e-6, min_lr 5e-6, wd 1e-8, MixToken and token labeling on the 24 x 24 grid). The 224
``pos_embed`` is resized bicubically as the original's loader does; from a ``.pth`` the weights read are the
ones the script fine-tuned from (the 384 pretrained cfg's ``weights_keys``).

Original result (README): 86.3% top-1 on ImageNet-1k val at 384px.
"""

from jvit import recipes


def get_config(arg=None):
    c = recipes.spvit_384_recipe(
        "spvit_l", batch_size=512, drop_path=0.3, ema=True, grad_accum_steps=4, rand_augment="rand-n3-m9-mstd0.5-inc1"
    )
    return recipes.finish(c, arg)
