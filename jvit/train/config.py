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

from jvit.data import preprocess
from jvit.errors import ConfigError
from jvit.models.layers import REMAT_POLICIES
from jvit.registry import list_models
from jvit.train import distributed, losses, optim, sharding

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


def default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with neutral defaults (no recipe, no dataset-specific values)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # a registered jvit model, e.g. 'sot_base'
    c.model.img_size = config_dict.placeholder(int)  # None: the variant's official resolution
    c.model.num_classes = config_dict.placeholder(int)  # None: the training dataset's classes
    c.model.dtype = "float32"  # compute dtype passed to the model ('bfloat16' on TPU/GPU)
    # Activation rematerialisation of the transformer blocks in the backward pass (jvit.models.layers.remat):
    # 'none' keeps every activation; 'dots' keeps the linear layers' outputs and recomputes the rest;
    # 'block' keeps only each block's input (least memory, one extra forward).
    c.model.remat = "none"
    c.model.kwargs = ml_collections.ConfigDict()  # factory overrides: drop_path_rate, depth, ...
    # BatchNorm batch statistics in training: 'per_device' (each device's rows, as the originals' DDP
    # training without SyncBN) or 'global' (the whole global batch, SyncBN).
    c.model.batch_norm = "per_device"
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
    c.input.device_prefetch = 2  # global batches placed on the devices ahead of the step; 0: none
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
    # Multi-process runs (jvit.train.distributed): enabled alone auto-detects a TPU pod / SLURM / Open MPI
    # cluster; coordinator_address (HOST:PORT, implies enabled) + num_processes + process_id launch explicitly.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)
    c.distributed.local_device_ids = ()  # (): all local devices
    c.distributed.initialization_timeout = 300  # seconds to reach the coordinator before failing

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.use_async = True

    # A jax.profiler trace of steps [first_step, first_step + num_steps) into <workdir>/profile
    # (clu periodic_actions.Profile); 0: no trace.
    c.profile = ml_collections.ConfigDict()
    c.profile.first_step = 0
    c.profile.num_steps = 5

    # Persistent XLA compilation cache: '' = <workdir>/compilation_cache, 'none' = off, or a directory
    # (shared by runs; safe across hosts of one job).
    c.compilation_cache_dir = ""

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
    errors += preprocess.validate(config.input, config.augment)
    errors += optim.validate(config)
    errors += losses.validate(config)
    errors += sharding.validate(config.mesh)
    errors += distributed.check(config.distributed)
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


def _check(errors: list[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def _value_errors(c: ml_collections.ConfigDict) -> list[str]:
    """Bad values of the trainer's own fields; each other section is checked by the code that uses it."""
    errors = []
    if c.model.name not in list_models():
        errors.append(f"model.name={c.model.name!r} is not one of: {', '.join(list_models())}")
    _check(errors, c.model.dtype in DTYPES, f"model.dtype={c.model.dtype!r} is not one of: {', '.join(DTYPES)}")
    _check(
        errors,
        c.model.remat in REMAT_POLICIES,
        f"model.remat={c.model.remat!r} is not one of: {', '.join(REMAT_POLICIES)}",
    )
    _check(
        errors,
        c.model.batch_norm in ("per_device", "global"),
        f"model.batch_norm={c.model.batch_norm!r} is not one of: per_device, global",
    )
    _check(
        errors, c.model.img_size is None or c.model.img_size > 0, f"model.img_size={c.model.img_size} must be positive"
    )
    _check(
        errors,
        c.model.num_classes is None or c.model.num_classes > 0,
        f"model.num_classes={c.model.num_classes} must be positive",
    )
    _check(errors, c.batch_size > 0, f"batch_size={c.batch_size} must be positive")
    _check(errors, c.grad_accum_steps >= 1, f"grad_accum_steps={c.grad_accum_steps} must be >= 1")
    _check(
        errors,
        c.grad_accum_steps >= 1 and c.batch_size % c.grad_accum_steps == 0,
        f"batch_size={c.batch_size} is not divisible by grad_accum_steps={c.grad_accum_steps}",
    )
    _check(
        errors,
        c.eval_batch_size is None or c.eval_batch_size > 0,
        f"eval_batch_size={c.eval_batch_size} must be positive",
    )
    _check(errors, c.num_epochs > 0, f"num_epochs={c.num_epochs} must be positive")
    _check(errors, c.cooldown_epochs >= 0, f"cooldown_epochs={c.cooldown_epochs} must be >= 0")
    _check(
        errors,
        c.num_train_steps is None or c.num_train_steps > 0,
        f"num_train_steps={c.num_train_steps} must be positive",
    )
    _check(errors, 0 <= c.ema.decay < 1, f"ema.decay={c.ema.decay} must be in [0, 1)")
    _check(errors, c.checkpoint.every_steps > 0, f"checkpoint.every_steps={c.checkpoint.every_steps} must be positive")
    _check(errors, c.checkpoint.keep >= 1, f"checkpoint.keep={c.checkpoint.keep} must be >= 1")
    _check(errors, c.log_every_steps > 0, f"log_every_steps={c.log_every_steps} must be positive")
    _check(
        errors,
        c.eval_every_steps is None or c.eval_every_steps >= 0,
        f"eval_every_steps={c.eval_every_steps} must be >= 0",
    )
    _check(errors, c.profile.num_steps > 0, f"profile.num_steps={c.profile.num_steps} must be positive")
    return errors
