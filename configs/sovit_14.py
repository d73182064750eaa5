"""So-ViT-14 (C=384, depth 14, cross-covariance 64x48, head dropout 0.5) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/sovit_14.py --workdir runs/sovit_14
    python -m jvit.main --config configs/sovit_14.py:mock --workdir /tmp/sovit_14_mock   # no dataset needed

Recipe (Xie et al., arXiv 2104.10935; the original's main.py + scripts): global batch 512, AdamW lr 0.001
(not rescaled with the batch), weight decay 0.05 except 1-D params and biases, 5 warmup epochs from
1e-6, cosine to 1e-5 per epoch over 300 epochs + 10 cooldown, label smoothing 0.1, drop path 0.1,
EMA 0.99996 over the whole state (the reported numbers are the EMA model's), seed 42.
DeiT augmentation (RandAugment, Mixup/CutMix, RandomErasing) is configured but not applied yet.

Original result: 81.8% top-1 (paper), 82.3% (upgrade); 24.6M params.
"""

from configs import base


def get_config(arg=None):
    c = base.timm_recipe(base.imagenet("sovit_14"), batch_size=512, lr=0.001, weight_decay=0.05,
                         drop_path=0.1, ema_decay=0.99996, cooldown_epochs=10)
    return base.finish(c, arg)
