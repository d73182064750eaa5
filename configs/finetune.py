"""Fine-tune a (converted) model on your own data: step-based schedule, transfer learning rate, new head.

    python -m jvit.main --config 'configs/finetune.py:hvt_ti_1,folder:/data/flowers,init=/ckpt/hvt_ti_1' \
        --workdir runs/flowers --config.num_train_steps=2000

The argument is ``MODEL,DATA[,key=value...]`` (comma-separated, so PATH must not contain a comma):

* ``MODEL``: a registered model (``jvit.list_models()``, e.g. ``stvit_small``);
* ``DATA``: ``folder:PATH`` (``PATH/train/<class>/*`` and ``PATH/val/<class>/*``), ``mock``, or a tfds
  name with ``train`` and ``test`` splits (e.g. ``cifar100``);
* ``init=DIR``: the starting weights, a converted directory (``python -m jvit.convert``) or an original
  ``.pth``; a head of another class count is re-initialised, a ``pos_embed`` of another size resized;
* ``img=N``: input size (default: the model's); ``steps=N``, ``batch=N``, ``lr=X``, ``warmup=F``
  (fraction of the run), ``layer_decay=X`` (e.g. 0.75), ``frozen`` (train the classifier only).

Which fields mean what (all overridable with ``--config.<field>=...``):
``num_train_steps`` is the run length and the schedule follows it: ``optimizer.warmup_steps`` (5% of
the run) and ``optimizer.decay_steps`` (the whole run) are tied to it, so changing it rescales warmup and
cosine instead of cutting them; ``optimizer.lr`` is the peak lr (1e-4, AdamW, not batch-scaled);
``optimizer.layer_decay`` and ``optimizer.trainable`` are the layer-wise decay and the frozen backbone;
``model.train_in_eval_mode`` trains with BatchNorm statistics kept and no drop path.
See :func:`jvit.recipes.finetune_recipe`.
"""

from jvit import recipes

_KEYS = {
    "init": ("init_from", str),
    "img": ("img_size", int),
    "steps": ("steps", int),
    "batch": ("batch_size", int),
    "lr": ("lr", float),
    "warmup": ("warmup_fraction", float),
    "layer_decay": ("layer_decay", float),
}


def get_config(arg=None):
    if not arg or "," not in arg:
        raise ValueError(f"configs/finetune.py needs 'MODEL,DATA[,key=value...]', got {arg!r} (see its docstring)")
    model, data, *options = arg.split(",")
    kwargs = {}
    for option in options:
        if option == "frozen":
            kwargs["frozen"] = True
            continue
        key, sep, value = option.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(
                f"unknown fine-tune option {option!r}; expected frozen or one of {', '.join(k + '=' for k in _KEYS)}"
            )
        name, kind = _KEYS[key]
        kwargs[name] = kind(value)
    return recipes.finetune_recipe(model, data, **kwargs)
