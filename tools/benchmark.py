"""Benchmark a registered jvit model: compile time, median step time, img/s, peak memory.

    python tools/benchmark.py --model sot_tiny --batch 8            # inference: model.apply, eval mode
    python tools/benchmark.py --model sot_tiny --batch 8 --train    # the trainer's jitted train step
    python tools/benchmark.py --model sot_tiny --batch 64 --train --dtype bfloat16 --remat dots

``--train`` times exactly the step ``python -m jvit.main`` runs (loss, grads, AdamW, EMA when the
recipe has one), built from ``configs/<model>.py`` when that recipe exists and from the shared timm
recipe otherwise, on random uint8 images; ``--remat`` sets ``model.remat`` (the blocks' activation
rematerialisation, :func:`jvit.models.layers.remat`). ``--train --plain`` times the work the originals'
``../shared/tools/bench_ref.py`` train step does (forward, loss, backward, AdamW): the recipe's in-step batch
augmentation (random erasing, Mixup/CutMix) and EMA off, everything else as the trainer runs it; quote
ratios to the originals from it. Prints figures only (no thresholds): the step is
compiled once (``compile_s``), run ``--warmup`` times, then timed ``--steps`` times with
``block_until_ready``. The compiled step's own buffers come from XLA's ``memory_analysis``: ``temp``
(activations and scratch, what remat shrinks; also per image), ``argument`` and ``output`` (state and
batch), ``xla_program`` their sum less the donated (aliased) bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jvit
from jvit import recipes
from jvit.models.layers import REMAT_POLICIES
from jvit.summary import summarize
from jvit.train import loop, sharding
from jvit.train.config import load_config_file

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# Dense peak TFLOP/s per chip (vendor datasheets; bf16 without sparsity, fp32 for float32 compute, where
# Hopper/Ampere float32 matmuls run as TF32 unless the precision is set to HIGHEST). The CPU row is the
# measured oneDNN ceiling of this project's 2-core CI machine (../shared/tools/README.md).
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},  # v5e
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},  # v5p
    "cpu": {"bfloat16": 0.347, "float32": 0.347},
}


def peak_tflops(device_kind: str, platform: str, dtype: str) -> float | None:
    """The table's peak for this device (longest matching name), ``None`` for an unknown chip."""
    names = [n for n in PEAK_TFLOPS if n.lower() in device_kind.lower()] or (["cpu"] if platform == "cpu" else [])
    return PEAK_TFLOPS[max(names, key=len)][dtype] if names else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=jvit.list_models(), metavar="NAME")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="default: the variant's official resolution")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--train", action="store_true", help="time the trainer's train step instead of inference")
    p.add_argument(
        "--plain",
        action="store_true",
        help="with --train: no in-step augmentation (random erasing, Mixup/CutMix) and no EMA, the originals' step",
    )
    p.add_argument("--scan", action="store_true", help="scan the block stack (model option scan_blocks=True)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument(
        "--remat", choices=REMAT_POLICIES, default="none", help="rematerialise the blocks' activations (model.remat)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (>= 10 recommended)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    p.add_argument("--peak-tflops", type=float, default=None, help="chip peak for MFU (default: the table)")
    args = p.parse_args(argv)
    if args.plain and not args.train:
        p.error("--plain changes the train step: use it with --train")
    return args


def train_config(args):
    """The model's recipe config (``configs/<model>.py:mock``) or the shared timm recipe, on mock data."""
    path = os.path.join(CONFIGS, f"{args.model}.py")
    if os.path.isfile(path):
        config = load_config_file(path, "mock")
        recipe = f"configs/{args.model}.py"
    else:
        config = recipes.finish(
            recipes.timm_recipe(
                recipes.imagenet(args.model), batch_size=args.batch, lr=1e-3, weight_decay=0.05, drop_path=0.1
            ),
            "mock",
        )
        recipe = "jvit/recipes.py timm_recipe (no recipe file for this model)"
    with config.unlocked():
        config.batch_size = args.batch
        config.grad_accum_steps = 1
        config.model.img_size = args.img_size
        config.model.num_classes = args.num_classes
        config.model.dtype = args.dtype
        config.model.remat = args.remat
        config.input.mock_num_classes = args.num_classes
        if args.scan:
            config.model.kwargs.scan_blocks = True
        if args.plain:
            config.augment.random_erasing = 0.0
            config.augment.mixup_alpha = config.augment.cutmix_alpha = 0.0
            config.ema.decay = 0.0
            recipe += " (plain: no random erasing, Mixup/CutMix or EMA)"
    return config, recipe


def model_kwargs(args) -> dict:
    """``create_model`` overrides of the benchmarked configuration (as the trainer passes them)."""
    kwargs = {"dtype": jnp.dtype(args.dtype)}
    if args.remat != "none":
        kwargs["remat"] = args.remat
    if args.scan:
        kwargs["scan_blocks"] = True
    return kwargs


def build(args):
    """``(step_fn, state, inputs, params_count, description)`` for the chosen mode."""
    if args.train:
        config, recipe = train_config(args)
        exp = loop.setup(config)
        state = loop.initial_state(exp)
        train_fn, _ = loop.compiled_steps(exp)
        rng = np.random.default_rng(0)
        local = {
            "image": rng.integers(0, 256, (args.batch, exp.img_size, exp.img_size, 3), dtype=np.uint8),
            "label": rng.integers(0, args.num_classes, (args.batch,), dtype=np.int32),
        }
        batch = sharding.global_batch(local, exp.mesh)
        desc = dict(recipe=recipe, ema=config.ema.decay, mesh=dict(exp.mesh.shape), img_size=exp.img_size)
        return train_fn, state, batch, jvit.count_params(state.params), desc
    model = jvit.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size, **model_kwargs(args))
    variables = jvit.init_variables(model, 0)
    x = jax.random.normal(jax.random.key(1), (args.batch, model.img_size, model.img_size, 3), jnp.float32)
    fn = jax.jit(lambda variables, x: (variables, model.apply(variables, x, train=False)))
    return fn, variables, x, jvit.count_params(variables["params"]), dict(img_size=model.img_size)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = jax.devices()[0]
    step_fn, state, inputs, params, desc = build(args)
    config = dict(
        model=args.model,
        batch=args.batch,
        mode="train" if args.train else "inference",
        dtype=args.dtype,
        remat=args.remat,
        steps=args.steps,
        warmup=args.warmup,
        device=device.device_kind,
        platform=device.platform,
        num_devices=jax.device_count(),
        jax=jax.__version__,
        **desc,
    )
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()), flush=True)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, inputs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    mib = lambda n, digits=1: round(n / 2**20, digits)  # noqa: E731
    memory = (
        {}
        if mem is None
        else dict(
            xla_temp_mib=mib(mem.temp_size_in_bytes),
            xla_temp_mib_per_image=mib(mem.temp_size_in_bytes / args.batch, 2),
            xla_argument_mib=mib(mem.argument_size_in_bytes),
            xla_output_mib=mib(mem.output_size_in_bytes),
            xla_program_mib=mib(
                mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
            ),
        )
    )

    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, out = compiled(state, inputs)
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
        **memory,
        device_peak_mib=round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None,
        host_peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        params=params,
    )
    # Model figures from XLA's analyses (jvit.summary) of the same configuration (dtype, remat); GFLOP/s
    # counts the eval forward's FLOPs per image.
    model_figures = summarize(
        jvit.create_model(args.model, num_classes=args.num_classes, img_size=desc["img_size"], **model_kwargs(args))
    )
    flops, act = model_figures["flops_per_image"], model_figures["activation_bytes_per_image"]
    figures.update(
        gflops_per_image=flops and round(flops / 1e9, 3),
        fwd_gflop_per_s=flops and round(flops / 1e9 * args.batch / median, 1),
        train_activation_mib_per_image=act and round(act / 2**20, 1),
    )
    # The timed step's own FLOPs (XLA cost analysis of the compiled program: forward + backward + optimizer
    # in train mode) over its time, against the chip's dense peak for the compute dtype. XLA counts a
    # loop body once: with scanned blocks the step is counted as 3x the (unrolled) forward instead, the
    # convention of ../shared/tools/bench_ref.py for the originals.
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    step_flops = (cost or {}).get("flops")
    if args.scan:
        step_flops = flops and (3 if args.train else 1) * flops * args.batch
    peak = args.peak_tflops or peak_tflops(device.device_kind, device.platform, args.dtype)
    achieved = step_flops and step_flops / median / 1e12
    figures.update(
        step_tflop=step_flops and round(step_flops / 1e12, 4),
        achieved_tflop_per_s=achieved and round(achieved, 3),
        peak_tflop_per_s=peak,
        mfu=achieved and peak and round(achieved / peak, 4),
        batch=args.batch,
        dtype=args.dtype,
    )
    finite = jax.tree.leaves(jax.tree.map(lambda a: bool(np.isfinite(np.asarray(a, np.float32)).all()), out))
    print(
        "result: " + " ".join(f"{k}={v}" for k, v in figures.items()) + ("" if all(finite) else " NON-FINITE"),
        flush=True,
    )
    if args.json:
        print(json.dumps({**config, **figures}, default=str))


if __name__ == "__main__":
    main()
