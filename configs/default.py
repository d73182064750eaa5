"""The embedded default: a small HVT on scikit-learn's 8x8 handwritten digits, no download.

    python -m jvit.main --config configs/default.py --workdir runs/default

The digits (1,437 train / 360 held-out test images) are built into a tfds dataset on first use
and read through the same grain pipeline as ImageNet, upscaled to 32x32. The model is HVT-Ti-1
shrunk through ``model.kwargs``: patch 4 (64 tokens), width 64 (2 heads x 32), 4 blocks, pooling
after blocks 0 and 2 (64 -> 31 -> 15 tokens); 0.21M parameters. 10 epochs (225 steps of 64).
Measured on 2 shared CPU cores: about 1.5 minutes, held-out top-1 0.986. Ends with
``final: step=225 ... eval/top1=0.9861 ...``."""

from jvit import recipes
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
    return recipes.finish(c, arg)
