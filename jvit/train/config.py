"""The trainer's configuration: every field with its neutral default, and the start-up checks.

:func:`default_config` is the schema. Experiment files (``configs/*.py``) start from it, set what
their recipe needs and return it locked, so a misspelt field in a file or on the command line
(``--config.optimzer.lr=...``) fails at once. :func:`validate` then checks values and names the
offending field. ``model.kwargs`` is the one free-form node: its entries go to the model factory
(``jvit.create_model(name, **kwargs)``), so any registered family works without trainer changes.

Units: ``batch_size`` is the global batch per optimizer update; with ``grad_accum_steps = k`` each
train step sees ``batch_size / k`` examples and the optimizer applies every ``k`` steps. "step"
everywhere (logging, checkpoints, ``num_train_steps``) counts train steps, i.e. batches consumed.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from jvit.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")

# The train augmentation (timm ``create_transform`` + ``Mixup`` + ``RandomErasing`` as the originals use
# them); every field's default is "off". Host side: jvit.data.augment; device side: jvit.train.batch_augment.
AUGMENT_DEFAULTS: dict[str, Any] = {
    "inception_crop": False,  # RandomResizedCrop(scale=crop_scale, ratio=crop_ratio); False: resize
    "crop_scale": (0.08, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "train_interpolation": "bicubic",  # 'bilinear' | 'bicubic' | 'random' (one of the two per image, timm)
    "hflip": 0.0,  # probability
    "rand_augment": "",  # timm spec, e.g. 'rand-m9-mstd0.5-inc1'
    "color_jitter": 0.0,  # brightness/contrast/saturation strength; timm uses it only without RandAugment
    "random_erasing": 0.0,  # probability, mode 'pixel', one rectangle (timm RandomErasing)
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "repeated_aug": 0,  # repeats per example (DeiT RASampler), 0 or 1 = off
    "mix_token": False,  # LV-ViT/SP-ViT MixToken on the patch tokens (models with a token-labeling aux head)
}
INTERPOLATIONS = ("bilinear", "bicubic", "random")


def default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with neutral defaults (no recipe, no dataset-specific values)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # a registered jvit model, e.g. 'sot_base'
    c.model.img_size = config_dict.placeholder(int)  # None: the variant's official resolution
    c.model.num_classes = config_dict.placeholder(int)  # None: the training dataset's classes
    c.model.dtype = "float32"  # compute dtype passed to the model ('bfloat16' on TPU/GPU)
    c.model.kwargs = ml_collections.ConfigDict()  # factory overrides: drop_path_rate, depth, ...
    # Train with the eval-mode forward: BatchNorm on (and keeping) its running stats, no drop path or
    # dropout (STViT's --finetune runs its model in eval mode).
    c.model.train_in_eval_mode = False

    # Start from weights: a jvit checkpoint directory (jvit.checkpoint.save_variables, e.g. written
    # by tools/convert_torch.py) or an original PyTorch .pth/.pth.tar. Heads whose class count
    # differs are re-initialised.
    c.init_from = ""
    c.init_weights_key = ""  # .pth only: wrapper entry to read instead of the variant's default

    c.input = ml_collections.ConfigDict()
    # 'folder:PATH' (PATH/<split>/<class>/<image>), a tfds name (read as ArrayRecord), 'jvit_digits', 'mock'
    c.input.dataset = "jvit_digits"
    c.input.data_dir = config_dict.placeholder(str)  # tfds data_dir; None: tfds's default
    c.input.manual_dir = config_dict.placeholder(str)  # tfds manual_dir (imagenet2012's tars), with prepare
    c.input.prepare = False  # build an unprepared tfds dataset in data_dir (downloading it if tfds can)
    c.input.train_split = "train"
    # Eval splits: names of input.dataset's splits or '<dataset>:<split>' (e.g. 'imagenet_v2:test').
    # The first one reports as eval/..., the others as eval_<dataset>_<split>/...
    c.input.eval_splits = ("test",)
    c.input.train_preprocess = "resize"  # 'augment' (config.augment, timm) | 'resize'
    c.input.eval_preprocess = "resize"  # 'center_crop' (crop_pct, timm eval) | 'resize'
    c.input.crop_pct = config_dict.placeholder(float)  # None: the model's pretrained cfg
    c.input.eval_interpolation = ""  # '': the model's pretrained cfg ('bicubic' for every jvit model)
    # Dense token labels (SP-ViT/LV-ViT): <dir>/<class>/<image stem>.pt|.npy score maps [2, k, S', S'].
    c.input.token_label_dir = ""
    c.input.mean = ()  # () = the model's pretrained cfg (ImageNet mean/std)
    c.input.std = ()
    c.input.num_threads = 4  # grain reader threads per host
    c.input.prefetch_batches = 4
    c.input.mock_train_examples = 256  # 'mock': random uint8 images and labels, made on the fly
    c.input.mock_eval_examples = 64
    c.input.mock_num_classes = 1000

    c.augment = ml_collections.ConfigDict(dict(AUGMENT_DEFAULTS))

    c.batch_size = 128  # global, per optimizer update
    c.eval_batch_size = config_dict.placeholder(int)  # None: the per-step train batch
    c.grad_accum_steps = 1
    c.num_epochs = 1.0
    c.cooldown_epochs = 0.0  # epochs at min_lr after the cosine (timm's cooldown)
    c.num_train_steps = config_dict.placeholder(int)  # overrides the epoch-derived length

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3  # peak learning rate (after scaling)
    c.optimizer.lr_base_batch_size = 0  # >0: lr * batch_size / this (linear scaling rule)
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.wd_exclude_1d = True  # no decay on 1-D params (biases, norm scales)
    c.optimizer.wd_exclude = ("bias$",)  # regexes (re.search) on 'a/b/c' param paths: no decay
    c.optimizer.wd_include = ()  # regexes: decay even if 1-D (params 1-D here but N-D in the original)
    c.optimizer.clip_grad_norm = 0.0  # 0: off
    c.optimizer.warmup_epochs = 0.0
    c.optimizer.warmup_lr = 1e-6
    c.optimizer.min_lr = 0.0
    c.optimizer.lr_per_epoch = False  # True: lr changes once per epoch (timm t_in_epochs)
    # Fine-tuning (jvit.train.finetune): schedule lengths in optimizer updates, layer-wise lr decay, frozen params.
    c.optimizer.warmup_steps = 0  # >0: warmup over this many updates instead of warmup_epochs
    c.optimizer.decay_steps = 0  # >0: cosine over this many updates instead of num_epochs, then min_lr
    c.optimizer.layer_decay = 1.0  # <1: lr of block i scaled by layer_decay ** (depth + 1 - layer id)
    c.optimizer.trainable = ()  # regexes on param paths; non-empty: only matching params are updated

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "softmax_xent"  # a name from jvit.train.losses.LOSSES
    c.loss.label_smoothing = 0.0
    # token_label with dense maps: read the crop box transposed, as the original's roi_align call does.
    c.loss.token_label_transposed_crop = True

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.0  # 0: no EMA; timm ModelEma e.g. 0.99996, updated per optimizer step
    c.ema.batch_stats = True  # also average batch_stats (timm averages the whole state dict)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1  # >1: shard params and optimizer state over this many devices
    c.mesh.fsdp_min_size = 2**14  # smaller arrays stay replicated
    c.distributed = False  # call jax.distributed.initialize() (multi-host GPU; TPU pods)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.use_async = True

    c.log_every_steps = 50
    c.eval_every_steps = config_dict.placeholder(int)  # None: once per epoch; 0: only at the end
    return c


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of an experiment file, exactly as ``--config path[:arg]`` loads it.

    Config files import only ``jvit`` (shared recipes live in :mod:`jvit.recipes`), so they load by
    path from any working directory.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    name = "jvit_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Lock ``config`` so unknown fields are rejected; ``model.kwargs`` stays open."""
    config.lock()
    config.model.kwargs.unlock()
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` naming every unknown field and bad value of ``config``."""
    errors = [f"unknown config field {name!r}" for name in _unknown_fields(config, default_config())]
    errors += _value_errors(config)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _unknown_fields(config: Any, schema: Any, prefix: str = "") -> list[str]:
    unknown = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in schema:
            unknown.append(name)
        elif name != "model.kwargs" and isinstance(value, ml_collections.ConfigDict):
            unknown += _unknown_fields(value, schema[key], name + ".")
    return unknown


def _value_errors(c: ml_collections.ConfigDict) -> list[str]:
    # Imported here: the registries pull in the models and the data pipeline.
    from jvit.data import augment
    from jvit.data.preprocess import EVAL_PREPROCESSORS, TRAIN_PREPROCESSORS
    from jvit.registry import list_models
    from jvit.train.losses import LOSSES

    errors = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def one_of(field: str, value: Any, allowed) -> None:
        check(value in allowed, f"{field}={value!r} is not one of: {', '.join(map(str, allowed))}")

    one_of("model.name", c.model.name, list_models())
    one_of("model.dtype", c.model.dtype, DTYPES)
    check(c.model.img_size is None or c.model.img_size > 0, f"model.img_size={c.model.img_size} must be positive")
    check(c.model.num_classes is None or c.model.num_classes > 0,
          f"model.num_classes={c.model.num_classes} must be positive")
    one_of("input.train_preprocess", c.input.train_preprocess, TRAIN_PREPROCESSORS)
    one_of("input.eval_preprocess", c.input.eval_preprocess, EVAL_PREPROCESSORS)
    check(c.input.crop_pct is None or 0 < c.input.crop_pct <= 1, f"input.crop_pct={c.input.crop_pct} must be in (0, 1]")
    if c.input.eval_interpolation:
        one_of("input.eval_interpolation", c.input.eval_interpolation, ("bilinear", "bicubic"))
    check(all(isinstance(s, str) and s for s in c.input.eval_splits),
          f"input.eval_splits={c.input.eval_splits!r} must be a tuple of split names")
    for field in ("mean", "std"):
        v = c.input[field]
        check(len(v) in (0, 3), f"input.{field}={v!r} must be empty (model default) or 3 numbers")
    check(all(s > 0 for s in c.input.std), f"input.std={c.input.std!r} must be positive")
    for field in ("mock_train_examples", "mock_eval_examples", "mock_num_classes"):
        check(c.input[field] > 0, f"input.{field}={c.input[field]} must be positive")
    check(c.input.num_threads >= 0, f"input.num_threads={c.input.num_threads} must be >= 0")
    check(c.input.prefetch_batches >= 0, f"input.prefetch_batches={c.input.prefetch_batches} must be >= 0")

    check(c.batch_size > 0, f"batch_size={c.batch_size} must be positive")
    check(c.grad_accum_steps >= 1, f"grad_accum_steps={c.grad_accum_steps} must be >= 1")
    check(c.grad_accum_steps >= 1 and c.batch_size % c.grad_accum_steps == 0,
          f"batch_size={c.batch_size} is not divisible by grad_accum_steps={c.grad_accum_steps}")
    check(c.eval_batch_size is None or c.eval_batch_size > 0, f"eval_batch_size={c.eval_batch_size} must be positive")
    check(c.num_epochs > 0, f"num_epochs={c.num_epochs} must be positive")
    check(c.cooldown_epochs >= 0, f"cooldown_epochs={c.cooldown_epochs} must be >= 0")
    check(c.num_train_steps is None or c.num_train_steps > 0, f"num_train_steps={c.num_train_steps} must be positive")

    o = c.optimizer
    one_of("optimizer.name", o.name, ("adamw",))
    check(o.lr > 0, f"optimizer.lr={o.lr} must be positive")
    check(o.lr_base_batch_size >= 0, f"optimizer.lr_base_batch_size={o.lr_base_batch_size} must be >= 0")
    check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1={o.b1}, b2={o.b2} must be in [0, 1)")
    check(o.eps > 0, f"optimizer.eps={o.eps} must be positive")
    check(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    for field in ("wd_exclude", "wd_include"):
        for pattern in o[field]:
            try:
                re.compile(pattern)
            except re.error as e:
                errors.append(f"optimizer.{field} entry {pattern!r} is not a regex: {e}")
    check(o.clip_grad_norm >= 0, f"optimizer.clip_grad_norm={o.clip_grad_norm} must be >= 0")
    check(o.warmup_epochs >= 0, f"optimizer.warmup_epochs={o.warmup_epochs} must be >= 0")
    check(o.warmup_lr >= 0 and o.min_lr >= 0,
          f"optimizer.warmup_lr={o.warmup_lr}, min_lr={o.min_lr} must be >= 0")

    a = c.augment
    one_of("augment.train_interpolation", a.train_interpolation, INTERPOLATIONS)
    check(len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
          f"augment.crop_scale={a.crop_scale!r} must be (low, high) with 0 < low <= high <= 1")
    check(len(a.crop_ratio) == 2 and 0 < a.crop_ratio[0] <= a.crop_ratio[1],
          f"augment.crop_ratio={a.crop_ratio!r} must be (low, high) with 0 < low <= high")
    for field in ("hflip", "random_erasing", "mixup_prob", "mixup_switch_prob"):
        check(0 <= a[field] <= 1, f"augment.{field}={a[field]} must be a probability in [0, 1]")
    for field in ("color_jitter", "mixup_alpha", "cutmix_alpha"):
        check(a[field] >= 0, f"augment.{field}={a[field]} must be >= 0")
    check(a.repeated_aug >= 0, f"augment.repeated_aug={a.repeated_aug} must be >= 0")
    if a.rand_augment:
        try:
            augment.RandAugment.from_spec(a.rand_augment, mean=(0.5, 0.5, 0.5), interpolation="bilinear")
        except ValueError as e:
            errors.append(f"augment.rand_augment={a.rand_augment!r}: {e}")
    check(not (a.rand_augment and a.color_jitter),
          "augment.color_jitter and augment.rand_augment are both set; timm applies colour jitter only without "
          "RandAugment (set color_jitter=0 to match the originals)")
    train_aug = c.input.train_preprocess == "augment"
    for field in ("inception_crop", "hflip", "rand_augment", "color_jitter"):
        check(train_aug or not a[field], f"augment.{field}={a[field]!r} needs input.train_preprocess='augment'")
    token_label = c.loss.name == "token_label"
    check(token_label or not a.mix_token, "augment.mix_token needs loss.name='token_label' (a model with an aux head)")
    check(token_label or not c.input.token_label_dir, "input.token_label_dir needs loss.name='token_label'")
    check(not c.input.token_label_dir or train_aug, "input.token_label_dir needs input.train_preprocess='augment'")
    check(not (token_label and (a.mixup_alpha or a.cutmix_alpha)),
          "Mixup/CutMix with loss.name='token_label' is not supported (SP-ViT/LV-ViT train with MixToken instead)")

    one_of("loss.name", c.loss.name, sorted(LOSSES))
    check(0 <= c.loss.label_smoothing < 1, f"loss.label_smoothing={c.loss.label_smoothing} must be in [0, 1)")
    check(0 <= c.ema.decay < 1, f"ema.decay={c.ema.decay} must be in [0, 1)")

    check(c.mesh.data == -1 or c.mesh.data >= 1, f"mesh.data={c.mesh.data} must be -1 or >= 1")
    check(c.mesh.fsdp >= 1, f"mesh.fsdp={c.mesh.fsdp} must be >= 1")
    check(c.mesh.fsdp_min_size >= 0, f"mesh.fsdp_min_size={c.mesh.fsdp_min_size} must be >= 0")
    check(c.checkpoint.every_steps > 0, f"checkpoint.every_steps={c.checkpoint.every_steps} must be positive")
    check(c.checkpoint.keep >= 1, f"checkpoint.keep={c.checkpoint.keep} must be >= 1")
    check(c.log_every_steps > 0, f"log_every_steps={c.log_every_steps} must be positive")
    check(c.eval_every_steps is None or c.eval_every_steps >= 0,
          f"eval_every_steps={c.eval_every_steps} must be >= 0")
    return errors
