"""The training and evaluation loops behind ``python -m jvit.main``."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import parameter_overview

import jvit
import jvit.checkpoint
from jvit.data import pipeline, preprocess, sources
from jvit.errors import ConfigError
from jvit.models import layers
from jvit.train import config as config_lib
from jvit.train import distributed, losses, optim, sharding, steps
from jvit.train import state as state_lib
from jvit.train import workdir as workdir_lib
from jvit.train.checkpointing import Checkpointer
from jvit.train.reporting import Reporter

log = logging.getLogger("jvit.train")


class NonFiniteLossError(RuntimeError):
    """The loss (or the updated parameters) stopped being finite."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Every fact of a run, resolved once from its config by :func:`setup` and read by the loop, the
    eval, ``tools/benchmark.py`` and every other tool (nothing downstream re-derives a default).

    Attributes:
      config: the validated config.
      mode: ``'train'`` or ``'eval'`` (eval opens no training split).
      mesh: the ``(data, fsdp)`` device mesh.
      model: the linen model for ``num_classes`` classes at ``img_size``.
      num_classes, class_names: the label space (names where the dataset or checkpoint has them).
      img_size, crop_pct, interpolation, mean, std: the input, with the model's pretrained cfg filling
        whatever the config leaves unset.
      train_split, eval_splits: opened data splits (``train_split`` is ``None`` in eval mode).
      train_preprocess, eval_preprocess: the per-example host transforms.
      step_batch: examples per train step (``batch_size / grad_accum_steps``); ``eval_batch``.
      steps_per_epoch, updates_per_epoch: train steps / optimizer updates per pass over the train split.
      total_steps: train steps of the whole run.
      tx, schedule: the optimizer and its learning rate per optimizer update.
      loss: the training loss object (:mod:`jvit.train.losses`).
      abstract_state: the :class:`TrainState`'s shapes and dtypes (the restore target with
        :meth:`restore_target`).
    """

    config: ml_collections.ConfigDict
    mode: str
    mesh: jax.sharding.Mesh
    model: Any
    num_classes: int
    class_names: tuple[str, ...] | None
    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_split: sources.Split | None
    eval_splits: dict[str, sources.Split]
    train_preprocess: preprocess.Preprocessor | None
    eval_preprocess: preprocess.Preprocessor
    step_batch: int
    eval_batch: int
    steps_per_epoch: float
    updates_per_epoch: float
    total_steps: int
    tx: optax.GradientTransformation
    schedule: optim.Schedule
    loss: Any
    abstract_state: state_lib.TrainState

    def state_shardings(self) -> Any:
        """``NamedSharding`` of every leaf of the train state on this experiment's mesh."""
        return sharding.state_shardings(self.abstract_state, self.mesh, self.config.mesh.fsdp_min_size)

    def restore_target(self) -> Any:
        """The train state as ``ShapeDtypeStruct``s carrying their shardings (what a checkpoint restores into)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_shardings()
        )

    def resolved_config(self) -> dict[str, Any]:
        """The config with every resolved value filled in, as written to ``<workdir>/config.json``."""
        resolved = self.config.to_dict()
        resolved["model"].update(img_size=self.img_size, num_classes=self.num_classes)
        resolved["input"].update(
            mean=list(self.mean), std=list(self.std), crop_pct=self.crop_pct, eval_interpolation=self.interpolation
        )
        resolved["num_train_steps"] = self.total_steps
        if self.class_names is not None:
            resolved["classes"] = list(self.class_names)
        return resolved


def _saved_run(workdir: str | None) -> dict[str, Any]:
    """The resolved config a previous run wrote into ``workdir`` (empty when there is none)."""
    path = os.path.join(workdir, "config.json") if workdir else ""
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _checkpoint_classes(config: ml_collections.ConfigDict, workdir: str | None) -> tuple[int | None, tuple | None]:
    """``(num_classes, class names)`` of what eval mode scores: the workdir's run, else ``init_from``'s
    metadata (a converted directory), else unknown."""
    run = _saved_run(workdir)
    if run:
        names = run.get("classes")
        return run["model"]["num_classes"], tuple(names) if names else None
    if config.init_from and os.path.isdir(os.path.expanduser(config.init_from)):
        meta_path = os.path.join(os.path.expanduser(config.init_from), jvit.checkpoint.METADATA_FILE)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            names = meta.get("classes")
            return meta.get("num_classes"), tuple(names) if names else None
    return None, None


def setup(config: ml_collections.ConfigDict, *, mode: str = "train", workdir: str | None = None) -> Experiment:
    """Validate ``config`` and resolve everything a run needs (see :class:`Experiment`).

    ``mode='eval'`` opens only the eval splits: the class count comes from ``model.num_classes``,
    the run in ``workdir``, ``init_from``'s metadata, or else the eval splits.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    config_lib.validate(config)
    distributed.initialize(config.distributed)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    pretrained = jvit.get_pretrained_cfg(config.model.name, config.model.img_size)
    img_size = pretrained.img_size
    open_split = functools.partial(sources.open_split, config.input, img_size=img_size, seed=config.seed)
    train_split = open_split(config.input.train_split, train=True) if mode == "train" else None
    eval_splits = {s: open_split(s, train=False) for s in config.input.eval_splits}

    if train_split is not None:
        num_classes, class_names = train_split.num_classes, train_split.class_names
    else:
        num_classes, class_names = _checkpoint_classes(config, workdir)
        if num_classes is None:
            num_classes = max((s.num_classes for s in eval_splits.values()), default=pretrained.num_classes)
            class_names = next((s.class_names for s in eval_splits.values() if s.num_classes == num_classes), None)
    if config.model.num_classes:
        if train_split is not None and config.model.num_classes < train_split.num_classes:
            raise ConfigError(
                f"model.num_classes={config.model.num_classes} < the dataset's {train_split.num_classes} classes"
            )
        if config.model.num_classes != num_classes:
            num_classes, class_names = config.model.num_classes, None
    for name, split in eval_splits.items():
        if split.num_classes > num_classes:
            raise ConfigError(f"eval split {name!r} has {split.num_classes} classes, the model {num_classes}")

    devices = jax.device_count()
    step_batch = config.batch_size // config.grad_accum_steps
    eval_batch = config.eval_batch_size or step_batch
    for name, b in (("batch_size / grad_accum_steps", step_batch), ("eval_batch_size", eval_batch)):
        if b % devices:
            raise ConfigError(f"{name} = {b} is not divisible by the {devices} devices")
    if train_split is not None:
        steps_per_epoch = len(train_split.data) / step_batch
        total = config.num_train_steps or math.ceil((config.num_epochs + config.cooldown_epochs) * steps_per_epoch)
        if total % config.grad_accum_steps:
            total += config.grad_accum_steps - total % config.grad_accum_steps  # end on a whole update
    else:  # eval: the schedule is never evaluated; the optimizer only gives the state's structure
        steps_per_epoch, total = 1.0, 0
    updates_per_epoch = steps_per_epoch / config.grad_accum_steps
    tx, schedule = optim.make_optimizer(config, updates_per_epoch)
    model = state_lib.build_model(config, num_classes)
    loss = losses.make_loss(config)
    loss.check_model(model)
    init = jvit.utils.init_fn(model)
    abstract = jax.eval_shape(lambda r: state_lib.new_state(init(r), tx, config), jax.random.key(0))
    mean = tuple(config.input.mean) or pretrained.mean
    crop_pct = config.input.crop_pct or pretrained.crop_pct
    interpolation = config.input.eval_interpolation or pretrained.interpolation
    return Experiment(
        config=config,
        mode=mode,
        mesh=mesh,
        model=model,
        num_classes=num_classes,
        class_names=class_names,
        img_size=img_size,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=mean,
        std=tuple(config.input.std) or pretrained.std,
        train_split=train_split,
        eval_splits=eval_splits,
        train_preprocess=preprocess.train_preprocessor(config, img_size=img_size, mean=mean) if train_split else None,
        eval_preprocess=preprocess.eval_preprocessor(
            config, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation
        ),
        step_batch=step_batch,
        eval_batch=eval_batch,
        steps_per_epoch=steps_per_epoch,
        updates_per_epoch=updates_per_epoch,
        total_steps=total,
        tx=tx,
        schedule=schedule,
        loss=loss,
        abstract_state=abstract,
    )


def save_config(exp: Experiment, workdir: str) -> None:
    """Write :meth:`Experiment.resolved_config` to ``<workdir>/config.json`` and the run's model
    metadata to ``<workdir>/jvit.json`` (process 0), warning about fields that changed since the
    previous run there."""
    path = os.path.join(workdir, "config.json")
    text = json.dumps(exp.resolved_config(), indent=2, sort_keys=True, default=str)
    old = _saved_run(workdir)
    if old:
        changed = _diff(old, json.loads(text))
        if changed:
            log.warning("config differs from the previous run in %s: %s", workdir, ", ".join(changed))
    if jax.process_index() == 0:
        with open(path, "w") as f:
            f.write(text + "\n")
        # The metadata a converted directory carries, so the run loads wherever one does (predict, init_from).
        jvit.checkpoint.write_run_metadata(
            workdir,
            model=exp.config.model.name,
            num_classes=exp.num_classes,
            img_size=exp.img_size,
            classes=exp.class_names,
            model_kwargs=exp.config.model.kwargs.to_dict(),
            source=exp.config.init_from or "jvit.main",
            crop_pct=exp.crop_pct,
            interpolation=exp.interpolation,
            mean=list(exp.mean),
            std=list(exp.std),
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [prefix[:-1]] if a != b else []


def initial_state(exp: Experiment) -> state_lib.TrainState:
    """Step-0 state (fresh init, or ``init_from`` weights), created directly in its shardings."""
    config, shardings = exp.config, exp.state_shardings()
    init = jvit.utils.init_fn(exp.model)
    rng = jax.random.key(config.seed)
    make_state = lambda v: state_lib.new_state(v, exp.tx, config)  # noqa: E731
    if not config.init_from:
        return jax.jit(lambda r: make_state(init(r)), out_shardings=shardings)(rng)
    fresh = jax.device_get(jax.jit(init)(rng))
    loaded = state_lib.load_pretrained(config)
    merged, reinit = state_lib.merge_pretrained(fresh, loaded, exp.num_classes)
    log.info(
        "initialised from %s%s",
        config.init_from,
        f"; re-initialised for {exp.num_classes} classes: {', '.join(reinit)}" if reinit else "",
    )
    return jax.jit(make_state, out_shardings=shardings)(merged)


def compiled_steps(exp: Experiment):
    """The jitted ``(train_step, eval_step)``: the train step takes and returns the state in its
    shardings (donated) and the batch split over the mesh; models with BatchNorm run their forward
    and backward per device unless ``model.batch_norm='global'``."""
    batch = sharding.batch_sharding(exp.mesh)
    shardings = exp.state_shardings()
    # BatchNorm statistics per device (the originals' DDP without SyncBN) unless the config asks for
    # global ones; models without BatchNorm keep one global forward (identical either way).
    per_device = exp.config.model.batch_norm == "per_device" and "batch_stats" in exp.abstract_state.collections
    train = jax.jit(
        functools.partial(
            steps.train_step,
            model=exp.model,
            tx=exp.tx,
            loss=exp.loss,
            config=exp.config,
            mean=exp.mean,
            std=exp.std,
            num_classes=exp.num_classes,
            batch_shards=exp.mesh.size,
            per_device_mesh=exp.mesh if per_device else None,
        ),
        in_shardings=(shardings, batch),
        out_shardings=(shardings, sharding.replicated(exp.mesh)),
        donate_argnums=0,
        # Keep the blocks' gradient barriers on XLA:CPU (layers.gradient_barrier).
        compiler_options=layers.barrier_compiler_options(),
    )
    evaluate = jax.jit(
        functools.partial(steps.eval_step, model=exp.model, mean=exp.mean, std=exp.std),
        out_shardings=sharding.replicated(exp.mesh),
        static_argnames="class_subset",
    )
    return train, evaluate


def run_evals(exp: Experiment, eval_fn, state: state_lib.TrainState) -> dict[str, float]:
    """Top-1/top-5/loss on every eval split for the raw model and, when kept, the EMA model.

    The first split reports as ``eval/...`` (``eval_ema/...``), the others as
    ``eval_<dataset>_<split>/...``. Accuracies are over the scored examples (all of them, except
    ReaL examples without labels), the loss over all.
    """
    models = {"": state.variables()}
    if state.ema:
        models["_ema"] = state.ema_variables()
    results = {}
    for i, (split, source) in enumerate(exp.eval_splits.items()):
        sums = {name: None for name in models}
        for local in pipeline.eval_batches(
            source.data,
            batch_size=exp.eval_batch,
            preprocess=exp.eval_preprocess,
            num_threads=exp.config.input.num_threads,
        ):
            batch = sharding.global_batch(local, exp.mesh)
            for name, variables in models.items():
                out = eval_fn(variables, batch, class_subset=source.class_subset)
                sums[name] = out if sums[name] is None else jax.tree.map(jnp.add, sums[name], out)
        base = "eval" if i == 0 else "eval_" + "".join(c if c.isalnum() else "_" for c in split).strip("_")
        for name, s in sums.items():
            s = jax.device_get(s)
            count, scored = float(s["count"]), float(s["scored"])
            if count != len(source.data):
                raise RuntimeError(f"eval of {split!r} saw {count:.0f} examples, the split has {len(source.data)}")
            for metric in ("top1", "top5"):
                results[f"{base}{name}/{metric}"] = float(s[metric]) / max(scored, 1.0)
            results[f"{base}{name}/loss"] = float(s["loss"]) / count
    return results


def _check_finite(
    step: int, metrics: dict[str, Any], last_checked: int, last_checkpoint: int | None, workdir: str
) -> float:
    """The loss of ``step``'s metrics; raises :class:`NonFiniteLossError` if any metric is not finite.

    Called only on logging, checkpoint and eval steps (fetching metrics syncs the host with the
    devices), always before a checkpoint is written, so no checkpoint ever holds a non-finite state.
    """
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(v) for v in values.values()):
        since = (
            f" (first seen at this check; the previous one, at step {last_checked}, was finite)"
            if (step - last_checked > 1)
            else ""
        )
        where = (
            f"the last checkpoint, step {last_checkpoint} in {os.path.join(workdir, 'checkpoints')}, was saved "
            "before it and is intact: rerunning resumes from it (lower the learning rate or check the input first)"
            if last_checkpoint is not None
            else "no checkpoint had been saved yet"
        )
        raise NonFiniteLossError(
            f"non-finite training values at step {step}: loss={values['loss']}, grad_norm={values['grad_norm']}, "
            f"param_norm={values['param_norm']}{since}; stopping. {where}"
        )
    return values["loss"]


def _compile(what: str, fn: Any, *args: Any) -> jax.stages.Compiled:
    """Compile ``fn`` for ``args`` ahead of time, saying so and how long it took (a persistent
    compilation cache, see :func:`enable_compilation_cache`, makes a restart's compile a cache read)."""
    log.info("compiling the %s ...", what)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    log.info("compiled the %s in %.1f s", what, time.perf_counter() - t0)
    return compiled


def enable_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Point JAX's persistent compilation cache at ``config.compilation_cache_dir`` (``''``:
    ``<workdir>/compilation_cache``; ``'none'``: off), so a resumed or restarted run loads its
    compiled steps instead of compiling them again.

    JAX reads this setting once per process, so the entry point (``jvit.main``) calls it before
    anything is compiled. Returns the directory, or ``None`` when off.
    """
    directory = config.compilation_cache_dir
    if directory == "none":
        return None
    directory = os.path.abspath(os.path.expanduser(directory or os.path.join(workdir, "compilation_cache")))
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory


def _final_line(step: int, results: dict[str, float], t0: float | None = None) -> None:
    """Print the run's ``final: step=N name=value ...`` line (what scripts and tests grep for)."""
    wall = "" if t0 is None else f" wall_s={time.time() - t0:.0f}"
    print(f"final: step={step} " + " ".join(f"{k}={v:.4f}" for k, v in results.items()) + wall, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluating every
    ``eval_every_steps`` and at the end; returns the final metrics and prints the ``final:`` line."""
    t0 = time.time()
    exp = setup(config, workdir=workdir)
    lock = workdir_lib.acquire(workdir, primary=jax.process_index() == 0)
    save_config(exp, workdir)
    iterator = pipeline.train_iterator(
        exp.train_split.data,
        batch_size=exp.step_batch,
        preprocess=exp.train_preprocess,
        seed=config.seed,
        repeated_aug=config.augment.repeated_aug,
        num_threads=config.input.num_threads,
        prefetch_batches=config.input.prefetch_batches,
    )
    batches = sharding.DevicePrefetch(iterator, exp.mesh, config.input.device_prefetch)
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, use_async=config.checkpoint.use_async)
    latest = ckpt.latest_step()
    if latest is None:
        state = initial_state(exp)
    else:
        latest, state = ckpt.restore_latest(exp.restore_target(), batches)
        log.info("resumed from %s at step %d", ckpt.directory, latest)
        if latest >= exp.total_steps:  # a finished run restarted: report it instead of training
            batches.close()
            ckpt.close()
            lock.release()
            return workdir_lib.report_finished(workdir, latest)
    train_fn, eval_fn = compiled_steps(exp)
    log.info(
        "%s: %d classes at %dpx, %s params; %d steps of %d examples (%.1f steps/epoch) on a %s mesh",
        config.model.name,
        exp.num_classes,
        exp.img_size,
        f"{jvit.count_params(state.params):,}",
        exp.total_steps,
        exp.step_batch,
        exp.steps_per_epoch,
        dict(exp.mesh.shape),
    )
    if log.isEnabledFor(logging.DEBUG):
        log.debug("parameters:\n%s", parameter_overview.get_parameter_overview(state.params, include_stats=False))

    eval_every = config.eval_every_steps
    if eval_every is None:
        eval_every = max(1, round(exp.steps_per_epoch))
    reporter = Reporter(
        workdir,
        exp.total_steps,
        primary=jax.process_index() == 0,
        log_every_steps=config.log_every_steps,
        profile_first_step=config.profile.first_step,
        profile_num_steps=config.profile.num_steps,
    )
    step = int(state.step)
    last_checkpoint, last_loss, results = latest, float("nan"), {}
    last_checked = step  # metrics are fetched (a host sync) only on logging/checkpoint/eval steps
    try:
        while step < exp.total_steps:
            batch = next(batches)
            if not isinstance(train_fn, jax.stages.Compiled):
                train_fn = _compile("train step", train_fn, state, batch)
            state, metrics = train_fn(state, batch)
            ckpt.check()  # a failed background save stops the run now
            step += 1
            reporter.step(step)
            save = step % config.checkpoint.every_steps == 0 or step == exp.total_steps
            evaluate = (eval_every and step % eval_every == 0) or step == exp.total_steps
            log_now = step % config.log_every_steps == 0 or step == exp.total_steps
            if save or evaluate or log_now:
                last_loss = _check_finite(step, metrics, last_checked, last_checkpoint, workdir)
                last_checked = step
            if log_now:
                lr = float(exp.schedule((step - 1) // config.grad_accum_steps))
                reporter.progress(step, last_loss, lr, exp.step_batch)
            if save:
                ckpt.save(step, state, batches)
                last_checkpoint = step
            if evaluate:
                with reporter.timed("eval"):
                    results = run_evals(exp, eval_fn, state)
                reporter.scalars(step, results, console=True)
        if not results:  # resumed a finished run: evaluate its final state
            results = run_evals(exp, eval_fn, state)
        ckpt.wait()
    finally:
        batches.close()
        ckpt.close()
        reporter.close()
        lock.release()
        skipped = getattr(exp.train_split.data, "skipped", 0)
        if skipped:
            log.warning(
                "%d unreadable training images were skipped (each replaced by the next readable one); "
                "the warnings above name them",
                skipped,
            )
    results = {"train/loss": last_loss, **results}
    _final_line(step, results, t0)
    return {"step": step, **results}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Eval-only: score the latest checkpoint in ``workdir`` (or, with none, ``config.init_from``:
    a converted directory or a released ``.pth``) on the configured eval splits and print the
    ``final:`` line. The training split is never opened: the classes come from the checkpoint."""
    exp = setup(config, mode="eval", workdir=workdir)
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, use_async=False)
    latest = ckpt.latest_step()
    try:
        if latest is not None:
            latest, state = ckpt.restore_latest(exp.restore_target(), None)
        elif config.init_from:
            state = initial_state(exp)
        else:
            raise ConfigError(f"nothing to evaluate: no checkpoint in {ckpt.directory} and no config.init_from")
    finally:
        ckpt.close()
    _, eval_fn = compiled_steps(exp)
    results = run_evals(exp, eval_fn, state)
    step = int(state.step)
    _final_line(step, results)
    return {"step": step, **results}
