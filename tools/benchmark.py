#!/usr/bin/env python
"""Benchmark a registered jvit model: compile time, median step time, img/s, peak memory.

    python tools/benchmark.py --model sot_tiny --batch 8            # inference (eval mode)
    python tools/benchmark.py --model sot_tiny --batch 8 --train    # AdamW train step

Prints figures only (no thresholds). Inputs are random; the step is jit-compiled once, run
``--warmup`` times, then timed ``--steps`` times with ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jvit


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=jvit.list_models(), metavar="NAME")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="default: the variant's official resolution")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--train", action="store_true", help="time an AdamW train step instead of inference")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--steps", type=int, default=10, help="timed steps (>= 10 recommended)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    return p.parse_args(argv)


def make_step(model, variables, train: bool):
    """``(step, state)``: an eval forward, or loss + grads + AdamW update with BN stats and dropout."""
    if not train:
        return (lambda state, x, y, rng: (state, model.apply(state["variables"], x, train=False))), {
            "variables": variables}

    tx = optax.adamw(1e-3, weight_decay=0.05)

    def step(state, x, y, rng):
        variables = state["variables"]

        def loss_fn(params):
            out, updates = model.apply({**variables, "params": params}, x, train=True,
                                       rngs={"dropout": rng}, mutable=["batch_stats"])
            logits = out[0] if isinstance(out, tuple) else out
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        upd, opt_state = tx.update(grads, state["opt_state"], variables["params"])
        params = optax.apply_updates(variables["params"], upd)
        return {"variables": {**variables, **updates, "params": params}, "opt_state": opt_state}, loss

    return step, {"variables": variables, "opt_state": tx.init(variables["params"])}


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = jvit.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size, dtype=dtype)
    size = model.img_size
    device = jax.devices()[0]
    config = dict(model=args.model, batch=args.batch, img_size=size, mode="train" if args.train else "inference",
                  dtype=args.dtype, steps=args.steps, warmup=args.warmup, device=device.device_kind,
                  platform=device.platform, num_devices=jax.device_count(), jax=jax.__version__)
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()), flush=True)

    variables = jvit.init_variables(model, 0)
    x = jax.random.normal(jax.random.key(1), (args.batch, size, size, 3), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, args.num_classes)
    fn, state = make_step(model, variables, args.train)
    jitted = jax.jit(fn, donate_argnums=0 if args.train else ())

    t0 = time.perf_counter()
    compiled = jitted.lower(state, x, y, jax.random.key(3)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                          + mem.temp_size_in_bytes - mem.alias_size_in_bytes)

    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, out = compiled(state, x, y, jax.random.key(10 + i))
        jax.block_until_ready(out)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)

    median = statistics.median(times)
    stats = device.memory_stats() or {}
    figures = dict(
        compile_s=round(compile_s, 2),
        step_ms_median=round(1e3 * median, 2),
        step_ms_min=round(1e3 * min(times), 2),
        step_ms_max=round(1e3 * max(times), 2),
        img_per_s=round(args.batch / median, 1),
        xla_program_mib=None if xla_bytes is None else round(xla_bytes / 2**20, 1),
        device_peak_mib=round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None,
        host_peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        params=jvit.count_params(variables["params"]),
    )
    assert np.isfinite(np.asarray(out, np.float32)).all(), "non-finite output"
    print("result: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
    if args.json:
        print(json.dumps({**config, **figures}))


if __name__ == "__main__":
    main()
