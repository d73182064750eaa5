"""Shared pieces of the experiment configs (``configs/*.py``): the ImageNet input, the timm/DeiT recipe, mock data.

An experiment file is a few lines: start from :func:`imagenet`, apply the recipe its original
used with that paper's numbers, and :func:`finish` it. Where every variant of a family shares one
recipe, it is a function here (:func:`sot_recipe`, :func:`hvt_recipe`,
:func:`stvit_recipe`, :func:`spvit_recipe`) and the variant files only name the model.
"""

from __future__ import annotations

import ml_collections

from jvit.registry import get_pretrained_cfg
from jvit.train.config import default_config, finalize

# The ImageNet eval suite (``--config configs/<x>.py:suite``): ImageNet-1k validation, ImageNetV2
# (matched frequency), ReaL labels (Beyer et al., 2020), ImageNet-A and ImageNet-R (200 classes each), all
# from tfds.
IMAGENET_SUITE = (
    "validation",
    "imagenet_v2:test",
    "imagenet2012_real:validation",
    "imagenet_a:test",
    "imagenet_r:test",
)


def imagenet(model: str, img_size: int | None = None) -> ml_collections.ConfigDict:
    """``model`` on ImageNet-1k (tfds ``imagenet2012``, prepared as ArrayRecord), eval on validation
    with timm's eval transform (resize by the model's crop_pct and interpolation, centre crop)."""
    c = default_config()
    c.model.name = model
    c.model.img_size = img_size
    c.input.dataset = "imagenet2012"
    c.input.train_split = "train"
    c.input.eval_splits = ("validation",)
    c.input.train_preprocess = "augment"
    c.input.eval_preprocess = "center_crop"
    return c


def timm_recipe(
    c: ml_collections.ConfigDict,
    *,
    batch_size: int,
    lr: float,
    weight_decay: float,
    drop_path: float,
    ema_decay: float = 0.0,
    lr_base_batch_size: int = 0,
    epochs: float = 300,
    cooldown_epochs: float = 0,
    warmup_epochs: float = 5,
    warmup_lr: float = 1e-6,
    min_lr: float = 1e-5,
    label_smoothing: float = 0.1,
    wd_exclude: tuple[str, ...] = ("bias$",),
    seed: int = 42,
    mixup: bool = True,
) -> ml_collections.ConfigDict:
    """The optimisation recipe every original shares (timm ``create_optimizer`` + ``CosineLRScheduler``):
    AdamW (0.9, 0.999, eps 1e-8), no decay on 1-D params and ``wd_exclude`` names, warmup from
    ``warmup_lr`` then cosine to ``min_lr`` stepped per epoch, label smoothing, drop path, optional
    EMA of the whole state (timm ``ModelEma``), and the DeiT augmentation (:func:`deit_augment`, with
    or without Mixup/CutMix)."""
    c.seed = seed
    c.batch_size = batch_size
    c.num_epochs = epochs
    c.cooldown_epochs = cooldown_epochs
    o = c.optimizer
    o.name = "adamw"
    o.lr, o.lr_base_batch_size = lr, lr_base_batch_size
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.weight_decay, o.wd_exclude_1d, o.wd_exclude = weight_decay, True, wd_exclude
    o.warmup_epochs, o.warmup_lr, o.min_lr = warmup_epochs, warmup_lr, min_lr
    o.lr_per_epoch = True
    c.loss.label_smoothing = label_smoothing
    c.model.kwargs.drop_path_rate = drop_path
    c.ema.decay, c.ema.batch_stats = ema_decay, True
    c.checkpoint.every_steps = 2000
    c.log_every_steps = 100
    return deit_augment(c, mixup=mixup)


def deit_augment(
    c: ml_collections.ConfigDict, *, repeated_aug: int = 0, mixup: bool = True
) -> ml_collections.ConfigDict:
    """The DeiT/timm train augmentation the originals use (timm ``create_transform`` with
    ``--aa rand-m9-mstd0.5-inc1 --reprob 0.25``): RandomResizedCrop (0.08-1, 3/4-4/3, random
    bilinear/bicubic), flip 0.5, RandAugment rand-m9-mstd0.5-inc1 (so no colour jitter),
    RandomErasing 0.25 (pixel mode), Mixup 0.8 / CutMix 1.0 (prob 1, switch 0.5), and optionally
    repeated augmentation."""
    a = c.augment
    a.inception_crop, a.crop_scale, a.train_interpolation = True, (0.08, 1.0), "random"
    a.hflip, a.rand_augment, a.random_erasing = 0.5, "rand-m9-mstd0.5-inc1", 0.25
    if mixup:
        a.mixup_alpha, a.cutmix_alpha, a.mixup_prob, a.mixup_switch_prob = 0.8, 1.0, 1.0, 0.5
    a.repeated_aug = repeated_aug
    return c


def sot_recipe(model: str, *, batch_size: int, lr: float, weight_decay: float) -> ml_collections.ConfigDict:
    """SoT's and So-ViT's ImageNet recipe (Xie et al., arXiv 2104.10935; the original's main.py + scripts,
    sot.md section 10): AdamW at the variant's batch, lr (not rescaled with the batch) and weight decay,
    no decay on 1-D params and biases, 5 warmup epochs from 1e-6, cosine to 1e-5 per epoch over 300 epochs
    + 10 cooldown, label smoothing 0.1, drop path 0.1, EMA 0.99996 over the whole state (the reported
    numbers are the EMA model's), seed 42."""
    return timm_recipe(
        imagenet(model),
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        drop_path=0.1,
        ema_decay=0.99996,
        cooldown_epochs=10,
    )


def hvt_recipe(model: str) -> ml_collections.ConfigDict:
    """HVT's ImageNet recipe (Pan et al., ICCV 2021; the original's main.py + config/*.json, hvt.md §6),
    the same for every variant: 8 x 128 images, AdamW lr 5e-4 per 512 images (1e-3 at 1024),
    weight decay 0.025 except 1-D params, biases and every ``pos_embed``, 5 warmup epochs from 1e-6,
    cosine to 1e-5 over 300 epochs (no cooldown), label smoothing 0.1, drop path 0.1, no EMA,
    repeated augmentation x3, seed 0."""
    c = timm_recipe(
        imagenet(model),
        batch_size=1024,
        lr=5e-4,
        lr_base_batch_size=512,
        weight_decay=0.025,
        wd_exclude=("bias$", "pos_embed$"),
        drop_path=0.1,
        seed=0,
    )
    c.augment.repeated_aug = 3
    return c


def stvit_recipe(model: str, drop_path: float) -> ml_collections.ConfigDict:
    """STViT's ImageNet recipe (Huang et al., CVPR 2023; the original's main.py, stvit.md section 7):
    8 x 128 images, AdamW lr 5e-4 per 512 images (1e-3 at 1024), weight decay 0.05 except 1-D params
    and biases but including the layer scales (4-D in PyTorch), 5 warmup epochs from 1e-6, cosine to
    1e-5 over 300 epochs (the scheduler's cooldown is never run), label smoothing 0.1, EMA 0.99996
    (kept, but the reported numbers are the raw model's), repeated augmentation x3, seed 0."""
    c = timm_recipe(
        imagenet(model),
        batch_size=1024,
        lr=5e-4,
        lr_base_batch_size=512,
        weight_decay=0.05,
        drop_path=drop_path,
        ema_decay=0.99996,
        seed=0,
    )
    c.optimizer.wd_include = ("gamma_[12]$",)
    c.augment.repeated_aug = 3
    return c


def spvit_recipe(
    model: str, *, batch_size: int, lr: float, drop_path: float, rand_augment: str = "rand-m9-mstd0.5-inc1"
) -> ml_collections.ConfigDict:
    """SP-ViT's ImageNet recipe (Zhou et al., "SP-ViT: Learning 2D Spatial Priors for Vision
    Transformers", BMVC 2022; LV-ViT's main.py + scripts, spvit.md section 6): AdamW at the variant's
    batch and lr (not rescaled), weight decay 0.05 except 1-D params, biases, ``pos_embed`` and
    ``cls_token``, 5 warmup epochs from 1e-6, cosine to 1e-5 per epoch over 300 epochs + 10 cooldown,
    label smoothing 0.1, EMA 0.99992 (the reported numbers are the EMA model's), no Mixup/CutMix but
    MixToken, seed 42, and the token-labeling loss.

    The original's token labels are dense score maps of an NFNet-F6 teacher
    (``--config.input.token_label_dir=DIR`` reads them); without them every token gets the image
    label (the original's ``--token-label`` without ``--token-label-data``)."""
    c = timm_recipe(
        imagenet(model),
        batch_size=batch_size,
        lr=lr,
        weight_decay=0.05,
        drop_path=drop_path,
        ema_decay=0.99992,
        cooldown_epochs=10,
        wd_exclude=("bias$", "pos_embed$", "cls_token$"),
        mixup=False,
    )
    c.loss.name = "token_label"
    c.augment.rand_augment = rand_augment
    c.augment.mix_token = True
    return c


def sot_finetune_recipe(model: str, *, drop_path: float) -> ml_collections.ConfigDict:
    """SoT's head on a released DeiT/Swin backbone (``deit_*_sot``, ``swin_*_sot``), fine-tuned on ImageNet-1k.

    ``init_from`` is the backbone's official release file (``PretrainedCfg.files``, downloaded from its
    ``urls`` into the working directory, or ``--config.init_from=PATH``): the converter loads the backbone
    strictly (DeiT's classifier as ``cls_fc``) and initialises the second-order head fresh.
    SoT trained its "+ours" models for 300 epochs from scratch (AdamW 1e-3 at 1024, wd 0.03, EMA);
    starting from converged backbones this recipe instead runs a DeiT/Swin-style fine-tune: 30 epochs
    at batch 1024, AdamW lr 1e-4 (scaled linearly per 1024 images; 10x the DeiT/Swin whole-model
    fine-tunes' 1e-5 because the 1-9M-parameter head starts from scratch, 10x below SoT's from-scratch
    1e-3 so the backbone is not undone), 2 warmup epochs from 1e-6, cosine to 1e-6, weight decay 0.05
    except 1-D params and biases, label smoothing 0.1, the DeiT augmentation with Mixup/CutMix
    (what the backbones were trained with), the backbone's own drop-path rate, no EMA (SoT's 0.99996
    averages over ~25k steps, most of this schedule). These numbers are jvit's choice, not a published
    recipe; nothing has been trained with them yet."""
    c = timm_recipe(
        imagenet(model),
        batch_size=1024,
        lr=1e-4,
        lr_base_batch_size=1024,
        weight_decay=0.05,
        drop_path=drop_path,
        epochs=30,
        warmup_epochs=2,
        min_lr=1e-6,
    )
    c.init_from = get_pretrained_cfg(model).files[0]
    return c


def finish(c: ml_collections.ConfigDict, arg: str | None = None) -> ml_collections.ConfigDict:
    """Apply the config-file argument (``--config configs/x.py:<arg>``) and lock the config.

    * ``'mock'``: random images instead of the dataset, so a full-size model starts training
      with no dataset at hand.
    * ``'folder:PATH'``: a folder of images in the ``PATH/train/<class>/*``, ``PATH/val/<class>/*``
      layout; classes are the sorted folder names of ``train``.
    * ``'suite'``: evaluate on :data:`IMAGENET_SUITE` (all prepared as tfds datasets).
    """
    if arg == "mock":
        c.input.dataset = "mock"
        c.input.mock_num_classes = 1000
    elif arg and arg.startswith("folder:"):
        c.input.dataset = arg
        c.input.train_split, c.input.eval_splits = "train", ("val",)
    elif arg == "suite":
        c.input.eval_splits = IMAGENET_SUITE
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected 'mock', 'folder:PATH' or 'suite'")
    return finalize(c)


def finetune_recipe(
    model: str,
    data: str,
    *,
    init_from: str = "",
    img_size: int | None = None,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-4,
    warmup_fraction: float = 0.05,
    layer_decay: float = 1.0,
    frozen: bool = False,
) -> ml_collections.ConfigDict:
    """Transfer ``model`` (weights from ``init_from``) to ``data``: ``'folder:PATH'``, ``'mock'`` or a tfds
    name (``train`` / ``test`` splits).

    Step-based, not the 300-epoch ImageNet recipe: AdamW at ``lr`` (not batch-scaled), weight decay 0.05,
    grad-norm clip 1.0, linear warmup from 1e-6 over ``warmup_fraction`` of the run, then cosine to 1e-6
    at its end. Both lengths are tied to ``num_train_steps`` (ml_collections field references), so
    ``--config.num_train_steps=N`` rescales the whole curve. Light augmentation (random-resized crop,
    flip; no RandAugment, Mixup/CutMix, random erasing or repeated augmentation), label smoothing 0.1,
    drop path 0.1, no EMA, eval at 5 points of the run. Heads of another class count are re-initialised
    by ``init_from``; a ``pos_embed`` of another resolution is resized (bicubic).

    ``layer_decay < 1``: layer-wise lr decay (:mod:`jvit.train.finetune`). ``frozen``: only the
    classifier (``head``, ``aux_head``, SoT's ``classifier``) trains, with the eval-mode forward
    (BatchNorm statistics kept, no drop path) - a linear probe.
    """
    c = default_config()
    c.model.name, c.model.img_size = model, img_size
    c.init_from = init_from
    c.batch_size = batch_size
    c.num_train_steps = steps
    run = c.get_ref("num_train_steps") // c.get_ref("grad_accum_steps")  # optimizer updates in the run
    o = c.optimizer
    o.name, o.lr, o.b1, o.b2, o.eps = "adamw", lr, 0.9, 0.999, 1e-8
    o.weight_decay, o.wd_exclude_1d, o.wd_exclude = 0.05, True, ("bias$", "pos_embed$", "cls_token$")
    o.clip_grad_norm = 1.0
    o.warmup_lr, o.min_lr = 1e-6, 1e-6
    o.decay_steps = run
    o.warmup_steps = (run * warmup_fraction).to_int()
    o.layer_decay = layer_decay
    if frozen:
        o.trainable = ("^(head|aux_head|classifier)/",)
        c.model.train_in_eval_mode = True
    c.loss.label_smoothing = 0.1
    c.model.kwargs.drop_path_rate = 0.1
    c.input.train_preprocess, c.input.eval_preprocess = "augment", "center_crop"
    c.augment.inception_crop, c.augment.hflip = True, 0.5
    c.eval_every_steps = c.get_ref("num_train_steps") // 5
    c.checkpoint.every_steps = 500
    c.log_every_steps = 10
    if data.startswith("folder:") or data == "mock":
        return finish(c, data)
    c.input.dataset, c.input.train_split, c.input.eval_splits = data, "train", ("test",)
    return finalize(c)


def stvit_384_recipe(model: str, drop_path: float) -> ml_collections.ConfigDict:
    """STViT's 384 px fine-tune (README command; stvit.md sections 2.9 and 7): from the 224 model
    (``--config.init_from``, strict), 30 epochs at 8 x 64 images, AdamW lr 5e-6 per 512 images held
    constant (``--lr 5e-6 --min-lr 5e-6``, no warmup), weight decay 1e-8, the 224 augmentation, EMA
    restarted from the loaded weights, and the model in eval mode throughout (``set_training_mode=False``:
    BatchNorm statistics frozen, drop path off even though ``drop_path`` is passed, as the original)."""
    c = stvit_recipe(model, drop_path=drop_path)
    c.model.img_size = 384
    c.model.train_in_eval_mode = True
    c.batch_size, c.num_epochs = 512, 30
    o = c.optimizer
    o.lr, o.lr_base_batch_size, o.min_lr, o.warmup_epochs, o.weight_decay = 5e-6, 512, 5e-6, 0, 1e-8
    return c


def spvit_384_recipe(
    model: str,
    *,
    batch_size: int,
    drop_path: float,
    ema: bool = False,
    grad_accum_steps: int = 1,
    rand_augment: str = "rand-m9-mstd0.5-inc1",
) -> ml_collections.ConfigDict:
    """SP-ViT's 384 px fine-tune (``distributed_fine_tune.sh``; spvit.md section 6): the 224 recipe at
    384 from the 224 weights (``--config.init_from``; ``pos_embed`` resized bicubically, heads kept), lr
    5e-6 with ``min_lr`` 5e-6 (so after the 5 warmup epochs from 1e-6 the lr is constant), weight decay
    1e-8, token labels on the 24 x 24 grid, EMA only where the script keeps it (L). The scripts set no
    epoch count, so the 300 + 10 of the 224 recipe apply as written; with a constant lr a shorter run
    (``--config.num_epochs``) is the same run stopped early."""
    c = spvit_recipe(model, batch_size=batch_size, lr=5e-6, drop_path=drop_path, rand_augment=rand_augment)
    c.model.img_size = 384
    c.grad_accum_steps = grad_accum_steps
    c.optimizer.min_lr, c.optimizer.weight_decay = 5e-6, 1e-8
    if not ema:
        c.ema.decay = 0.0
    return c
