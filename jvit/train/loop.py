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

import jvit
from jvit.data import pipeline, preprocess, sources
from jvit.train import config as config_lib
from jvit.train import losses, optim, sharding, state as state_lib, steps, workdir as workdir_lib
from jvit.train.checkpointing import Checkpointer
from jvit.train.reporting import Reporter

log = logging.getLogger("jvit.train")


class NonFiniteLossError(RuntimeError):
    """The loss (or the updated parameters) stopped being finite."""


@dataclasses.dataclass
class Experiment:
    """Everything resolved from a config before the first step."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    img_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model: Any
    train_split: sources.Split
    eval_splits: dict[str, sources.Split]
    train_preprocess: preprocess.Preprocessor
    eval_preprocess: preprocess.Preprocessor
    step_batch: int  # examples per train step (batch_size / grad_accum_steps)
    eval_batch: int
    total_steps: int
    steps_per_epoch: float


def setup(config: ml_collections.ConfigDict, *, train: bool = True) -> Experiment:
    """Validate ``config`` and resolve the mesh, data splits, model and run length."""
    config_lib.validate(config)
    if config.distributed:
        jax.distributed.initialize()
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    pretrained = jvit.get_pretrained_cfg(config.model.name, config.model.img_size)
    img_size = pretrained.img_size
    train_split = sources.open_split(config.input, config.input.train_split, train=True, img_size=img_size,
                                     seed=config.seed)
    num_classes = config.model.num_classes or train_split.num_classes
    if num_classes < train_split.num_classes:
        raise config_lib.ConfigError(
            f"model.num_classes={num_classes} < the dataset's {train_split.num_classes} classes")
    eval_splits = {s: sources.open_split(config.input, s, train=False, img_size=img_size, seed=config.seed)
                   for s in config.input.eval_splits}
    for name, split in eval_splits.items():
        if split.num_classes > num_classes:
            raise config_lib.ConfigError(f"eval split {name!r} has {split.num_classes} classes, the model {num_classes}")
    mean = tuple(config.input.mean) or pretrained.mean
    train_preprocess = preprocess.train_preprocessor(config, img_size=img_size, mean=mean)
    eval_preprocess = preprocess.eval_preprocessor(
        config, img_size=img_size, crop_pct=config.input.crop_pct or pretrained.crop_pct,
        interpolation=config.input.eval_interpolation or pretrained.interpolation)
    devices = jax.device_count()
    step_batch = config.batch_size // config.grad_accum_steps
    eval_batch = config.eval_batch_size or step_batch
    for name, b in (("batch_size / grad_accum_steps", step_batch), ("eval_batch_size", eval_batch)):
        if b % devices:
            raise config_lib.ConfigError(f"{name} = {b} is not divisible by the {devices} devices")
    steps_per_epoch = len(train_split.data) / step_batch
    total = config.num_train_steps or math.ceil((config.num_epochs + config.cooldown_epochs) * steps_per_epoch)
    if total % config.grad_accum_steps:
        total += config.grad_accum_steps - total % config.grad_accum_steps  # end on a whole update
    return Experiment(
        config=config, mesh=mesh, img_size=img_size, num_classes=num_classes,
        mean=mean, std=tuple(config.input.std) or pretrained.std,
        model=state_lib.build_model(config, num_classes), train_split=train_split, eval_splits=eval_splits,
        train_preprocess=train_preprocess, eval_preprocess=eval_preprocess,
        step_batch=step_batch, eval_batch=eval_batch, total_steps=total, steps_per_epoch=steps_per_epoch,
    )


def save_config(exp: Experiment, workdir: str) -> None:
    """Write the config with its resolved values (image size, classes, mean/std, length) to
    ``<workdir>/config.json``, warning about fields that changed since the previous run there."""
    resolved = exp.config.to_dict()
    resolved["model"].update(img_size=exp.img_size, num_classes=exp.num_classes)
    pretrained = jvit.get_pretrained_cfg(exp.config.model.name, exp.config.model.img_size)
    resolved["input"].update(mean=list(exp.mean), std=list(exp.std),
                             crop_pct=exp.config.input.crop_pct or pretrained.crop_pct,
                             eval_interpolation=exp.config.input.eval_interpolation or pretrained.interpolation)
    resolved["num_train_steps"] = exp.total_steps
    path = os.path.join(workdir, "config.json")
    text = json.dumps(resolved, indent=2, sort_keys=True, default=str)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = _diff(old, json.loads(text))
        if changed:
            log.warning("config differs from the previous run in %s: %s", workdir, ", ".join(changed))
    if jax.process_index() == 0:
        with open(path, "w") as f:
            f.write(text + "\n")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [prefix[:-1]] if a != b else []


def abstract_state(exp: Experiment, tx) -> tuple[Any, Any, Any]:
    """``(abstract TrainState, its shardings, the variables' init function)``, allocating nothing."""
    model = exp.model
    x = jnp.zeros((1, exp.img_size, exp.img_size, 3), jnp.float32)

    def init(rng):
        variables = model.init(rng, x, train=False)
        return {k: v for k, v in variables.items() if k != "intermediates"}

    abstract = jax.eval_shape(lambda r: state_lib.new_state(init(r), tx, exp.config), jax.random.key(0))
    shardings = sharding.state_shardings(abstract, exp.mesh, exp.config.mesh.fsdp_min_size)
    return abstract, shardings, init


def initial_state(exp: Experiment, tx) -> tuple[state_lib.TrainState, Any]:
    """Step-0 state (fresh init, or ``init_from`` weights), created directly in its shardings."""
    _, shardings, init = abstract_state(exp, tx)
    rng = jax.random.key(exp.config.seed)
    make_state = lambda v: state_lib.new_state(v, tx, exp.config)  # noqa: E731
    if not exp.config.init_from:
        return jax.jit(lambda r: make_state(init(r)), out_shardings=shardings)(rng), shardings
    fresh = jax.device_get(jax.jit(init)(rng))
    loaded = state_lib.load_pretrained(exp.config)
    merged, reinit = state_lib.merge_pretrained(fresh, loaded, exp.num_classes)
    log.info("initialised from %s%s", exp.config.init_from,
             f"; re-initialised for {exp.num_classes} classes: {', '.join(reinit)}" if reinit else "")
    return jax.jit(make_state, out_shardings=shardings)(merged), shardings


def compiled_steps(exp: Experiment, tx, state_shardings):
    """The jitted ``(train_step, eval_step)``: the train step takes and returns the state in
    ``state_shardings`` (donated) and the batch split over the mesh."""
    batch = sharding.batch_sharding(exp.mesh)
    loss_fn = losses.LOSSES[exp.config.loss.name]
    train = jax.jit(
        functools.partial(steps.train_step, model=exp.model, tx=tx, loss_fn=loss_fn, config=exp.config,
                          mean=exp.mean, std=exp.std, num_classes=exp.num_classes,
                          token_grid=getattr(exp.model, "token_grid", None)),
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, sharding.replicated(exp.mesh)),
        donate_argnums=0,
    )
    evaluate = jax.jit(functools.partial(steps.eval_step, model=exp.model, mean=exp.mean, std=exp.std),
                       out_shardings=sharding.replicated(exp.mesh), static_argnames="class_subset")
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
        for local in pipeline.eval_batches(source.data, batch_size=exp.eval_batch, preprocess=exp.eval_preprocess,
                                           num_threads=exp.config.input.num_threads):
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


def _check_finite(step: int, metrics: dict[str, Any], last_checkpoint: int | None, workdir: str) -> float:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(v) for v in values.values()):
        where = (f"the last checkpoint, step {last_checkpoint} in {os.path.join(workdir, 'checkpoints')}, was saved "
                 "before it and is intact: rerunning resumes from it (lower the learning rate or check the input first)"
                 if last_checkpoint is not None else "no checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"non-finite training values at step {step}: loss={values['loss']}, grad_norm={values['grad_norm']}, "
            f"param_norm={values['param_norm']}; stopping. {where}"
        )
    return values["loss"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluating every
    ``eval_every_steps`` and at the end; returns the final metrics and prints the ``final:`` line."""
    t0 = time.time()
    exp = setup(config)
    lock = workdir_lib.acquire(workdir, primary=jax.process_index() == 0)
    save_config(exp, workdir)
    primary = jax.process_index() == 0
    updates_per_epoch = exp.steps_per_epoch / config.grad_accum_steps
    tx, schedule = optim.make_optimizer(config, updates_per_epoch)
    iterator = pipeline.train_iterator(
        exp.train_split.data, batch_size=exp.step_batch, preprocess=exp.train_preprocess, seed=config.seed,
        repeated_aug=config.augment.repeated_aug, num_threads=config.input.num_threads,
        prefetch_batches=config.input.prefetch_batches,
    )
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, use_async=config.checkpoint.use_async)
    latest = ckpt.latest_step()
    if latest is None:
        state, shardings = initial_state(exp, tx)
    else:
        abstract, shardings, _ = abstract_state(exp, tx)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        latest, state = ckpt.restore_latest(target, iterator)
        log.info("resumed from %s at step %d", ckpt.directory, latest)
        if latest >= exp.total_steps:  # a finished run restarted: report it instead of training
            ckpt.close()
            lock.release()
            return workdir_lib.report_finished(workdir, latest)
    train_fn, eval_fn = compiled_steps(exp, tx, shardings)
    log.info("%s: %d classes at %dpx, %s params; %d steps of %d examples (%.1f steps/epoch) on a %s mesh",
             config.model.name, exp.num_classes, exp.img_size, f"{jvit.count_params(state.params):,}",
             exp.total_steps, exp.step_batch, exp.steps_per_epoch, dict(exp.mesh.shape))

    eval_every = config.eval_every_steps
    if eval_every is None:
        eval_every = max(1, round(exp.steps_per_epoch))
    reporter = Reporter(workdir, exp.total_steps, primary=primary)
    step = int(state.step)
    last_checkpoint, last_loss, results = latest, float("nan"), {}
    pending = None  # (step, metrics) of the step in flight, checked one step later
    try:
        while step < exp.total_steps:
            batch = sharding.global_batch(next(iterator), exp.mesh)
            state, metrics = train_fn(state, batch)
            ckpt.check()  # a failed background save stops the run now
            step += 1
            if pending is not None:
                last_loss = _check_finite(*pending, last_checkpoint, workdir)
            pending = (step, metrics)
            save = step % config.checkpoint.every_steps == 0 or step == exp.total_steps
            evaluate = (eval_every and step % eval_every == 0) or step == exp.total_steps
            log_now = step % config.log_every_steps == 0 or step == exp.total_steps
            if save or evaluate or log_now:
                last_loss = _check_finite(*pending, last_checkpoint, workdir)
                pending = None
            if log_now:
                reporter.progress(step, last_loss, float(schedule((step - 1) // config.grad_accum_steps)),
                                  exp.step_batch)
            if step == 1 or (latest is not None and step == latest + 1):
                reporter.start(step)  # exclude compilation from img/s and ETA
            if save:
                ckpt.save(step, state, iterator)
                last_checkpoint = step
            if evaluate:
                results = run_evals(exp, eval_fn, state)
                reporter.scalars(step, results, console=True)
        if not results:  # resumed a finished run: evaluate its final state
            results = run_evals(exp, eval_fn, state)
        ckpt.wait()
    finally:
        ckpt.close()
        reporter.close()
        lock.release()
        skipped = getattr(exp.train_split.data, "skipped", 0)
        if skipped:
            log.warning("%d unreadable training images were skipped (each replaced by the next readable one); "
                        "the warnings above name them", skipped)
    results = {"train/loss": last_loss, **results}
    summary = " ".join(f"{k}={v:.4f}" for k, v in results.items())
    print(f"final: step={step} {summary} wall_s={time.time() - t0:.0f}", flush=True)
    return {"step": step, **results}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Eval-only: score the latest checkpoint in ``workdir`` (or, with none, ``config.init_from``)
    on the configured eval splits and print the ``final:`` line."""
    exp = setup(config)
    tx, _ = optim.make_optimizer(config, exp.steps_per_epoch / config.grad_accum_steps)
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, use_async=False)
    latest = ckpt.latest_step()
    try:
        if latest is not None:
            abstract, shardings, _ = abstract_state(exp, tx)
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
            latest, state = ckpt.restore_latest(target, None)
        elif config.init_from:
            state, shardings = initial_state(exp, tx)
        else:
            raise config_lib.ConfigError(f"nothing to evaluate: no checkpoint in {ckpt.directory} and no config.init_from")
    finally:
        ckpt.close()
    _, eval_fn = compiled_steps(exp, tx, shardings)
    results = run_evals(exp, eval_fn, state)
    step = int(state.step)
    print(f"final: step={step} " + " ".join(f"{k}={v:.4f}" for k, v in results.items()), flush=True)
    return {"step": step, **results}
