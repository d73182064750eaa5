"""SoT-Small (C=384, depth 14, MGCrP 6x24, head dropout 0.5) on ImageNet-1k at 224px, the original recipe.

    python -m jvit.main --config configs/sot_small.py --workdir runs/sot_small
    python -m jvit.main --config configs/sot_small.py:mock --workdir /tmp/sot_small_mock   # no dataset needed

Recipe (Xie et al., arXiv 2104.10935; the original's main.py + scripts): global batch 1024, AdamW lr 0.001
(not rescaled with the batch), weight decay 0.03 except 1-D params and biases, 5 warmup epochs from
1e-6, cosine to 1e-5 per epoch over 300 epochs + 10 cooldown, label smoothing 0.1, drop path 0.1,
EMA 0.99996 over the whole state (the reported numbers are the EMA model's), seed 42.
DeiT augmentation (RandAugment, Mixup/CutMix, RandomErasing) is configured but not applied yet.

Original result: 82.7% top-1, 31.8% on ImageNet-A; 27.0M params.
"""

from configs import base


def get_config(arg=None):
    c = base.timm_recipe(base.imagenet("sot_small"), batch_size=1024, lr=0.001, weight_decay=0.03,
                         drop_path=0.1, ema_decay=0.99996, cooldown_epochs=10)
    return base.finish(c, arg)
