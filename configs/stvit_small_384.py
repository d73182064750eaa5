"""STViT-S (SViT-S) fine-tuned from 224 to 384 px on ImageNet-1k, the original's fine-tune.

    python -m jvit.main --config configs/stvit_small_384.py --workdir runs/stvit_small_384 \
        --config.init_from=CONVERTED_224_DIR_OR_stvit-small-224.pth
    python -m jvit.main --config configs/stvit_small_384.py:mock --workdir /tmp/stvit_small_384_mock
    # (no dataset needed)

Recipe: :func:`jvit.recipes.stvit_384_recipe` (30 epochs, batch 512, constant lr 5e-6, wd 1e-8, the model in
eval mode throughout: BatchNorm statistics frozen and drop path off although drop path 0.1 is passed, as the
original). STViT has no position tables, so the 224 weights load unchanged.

Original result (README): 85.0% top-1 on ImageNet-1k val at 384px (raw weights, crop_pct 1.0).
"""

from jvit import recipes


def get_config(arg=None):
    return recipes.finish(recipes.stvit_384_recipe("stvit_small", drop_path=0.1), arg)
