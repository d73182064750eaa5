"""The embedded default: a small HVT on scikit-learn's 8x8 handwritten digits, no download.

    python -m jvit.main --config configs/default.py --workdir runs/default

The digits (1,437 train / 360 held-out test images) are built into a tfds dataset on first use
and read through the same grain pipeline as ImageNet. Ends with ``final: step=... eval/top1=...``.
"""

from configs import base
from jvit.train.config import default_config


def get_config(arg=None):
    c = default_config()
    c.seed = 0
    c.model.name = "hvt_ti_1"
    c.model.img_size = 32
    c.model.kwargs.patch_size = 4
    c.model.kwargs.num_heads = 2
    c.model.kwargs.head_dim = 32
    c.model.kwargs.num_blocks = 4
    c.model.kwargs.pool_block_width = 2
    c.input.dataset = "jvit_digits"
    c.input.eval_splits = ("test",)
    c.input.mean, c.input.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    c.batch_size = 64
    c.num_epochs = 10
    o = c.optimizer
    o.lr, o.weight_decay, o.warmup_epochs, o.min_lr = 2e-3, 0.05, 1.0, 1e-5
    c.loss.label_smoothing = 0.1
    c.checkpoint.every_steps = 100
    c.log_every_steps = 10
    return base.finish(c, arg)
