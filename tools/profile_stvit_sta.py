"""How much of stvit_small's step time goes to super token attention (STA)? An ablation on CPU.

    python tools/profile_stvit_sta.py [--batch 8] [--img-size 224] [--rounds 10]

Times jitted inference (eval forward) and training (forward + backward + SGD update, train mode,
drop path 0.1) steps of ``stvit_small`` with random weights, in four versions of the network that
differ only in the super-token stages (stoken_size > 1, stages 1-2):

* ``full``: the real model;
* ``pool_unpool``: STA's association replaced by the simplest super-token scheme (cell mean ->
  the same MHSA -> nearest upsampling), i.e. full minus the cost of the 9-way soft association,
  the association-weighted sampling and the association-weighted mapping back;
* ``no_sta``: STA in stages 1-2 replaced by the identity (no super tokens, no MHSA);
* ``no_attention``: additionally the global MHSA of stages 3-4 replaced by the identity.

It also times the STA module alone (forward and forward + backward) at the stage-1/2 shapes,
multiplied by the number of such blocks, as a second estimate that does not rely on XLA fusing
the ablated graphs alike. Versions run interleaved, round after round, and medians are
reported, so a slow phase of a shared machine hits all of them. This is a measurement script,
not a test; the figures depend on the machine (see the README for recorded ones).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jvit  # noqa: E402
from jvit.models import layers, stvit  # noqa: E402

REAL_STA = stvit.SuperTokenAttention


class AblatedSTA(REAL_STA):
    """Stand-in for :class:`SuperTokenAttention` in the ablations (``mode`` picks the version)."""

    mode: str = "full"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s = self.stoken_size
        if self.mode == "full" or (s == 1 and self.mode != "no_attention"):
            fields = {
                f: getattr(self, f)
                for f in (
                    "stoken_size",
                    "n_iter",
                    "num_heads",
                    "qkv_bias",
                    "qk_scale",
                    "attn_drop",
                    "proj_drop",
                    "dtype",
                )
            }
            return REAL_STA(**fields, name="inner")(x, train)
        if self.mode in ("no_sta", "no_attention"):
            return x
        # pool_unpool: cell means -> MHSA -> nearest upsampling, with STA's padding and crop.
        b, h, w, c = x.shape
        cells = stvit.to_cells(jnp.pad(x, ((0, 0), (0, -h % s), (0, -w % s), (0, 0))), s)
        hh, ww = cells.shape[1], cells.shape[3]
        means = cells.mean(axis=(2, 4)).reshape(b, -1, c)
        tokens = layers.Attention(self.num_heads, self.qkv_bias, name="stoken_refine")(means).reshape(
            b, hh, 1, ww, 1, c
        )
        return jnp.broadcast_to(tokens, cells.shape).reshape(b, hh * s, ww * s, c)[:, :h, :w]


@contextlib.contextmanager
def ablated(mode: str):
    """Build and trace stvit_small with :class:`AblatedSTA` in ``mode`` in place of STA."""
    stvit.SuperTokenAttention = functools.partial(AblatedSTA, mode=mode)
    try:
        yield
    finally:
        stvit.SuperTokenAttention = REAL_STA


def steps(model, x: jax.Array, y: jax.Array) -> tuple[Callable, Callable]:
    """Jitted inference ``f(variables)`` and train ``f(variables, rng)`` steps on the batch ``(x, y)``."""

    def infer(variables):
        return model.apply(variables, x, train=False)

    def train(variables, rng):
        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params}, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 1e-3 * g, variables["params"], grads)
        return loss, {**variables, **updates, "params": params}

    return jax.jit(infer), jax.jit(train, compiler_options=layers.barrier_compiler_options())


def timed(fn: Callable, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def sta_alone(batch: int, img_size: int, rounds: int) -> dict[str, float]:
    """Seconds per step spent in all super-token STA blocks of stvit_small, timed module by module."""
    totals = {"infer": 0.0, "train": 0.0}
    side = -(-img_size // 4)  # the stem's two stride-2 convs
    # stage: (stoken_size, width, heads, blocks, token grid side)
    for s, c, heads, depth, size in ((8, 64, 1, 3, side), (4, 128, 2, 5, -(-side // 2))):
        sta = REAL_STA(stoken_size=s, n_iter=1, num_heads=heads)
        x = jax.random.normal(jax.random.key(0), (batch, size, size, c))
        v = sta.init(jax.random.key(1), x)
        fwd = jax.jit(sta.apply)
        bwd = jax.jit(jax.grad(lambda v, x, sta=sta: (sta.apply(v, x) ** 2).sum(), argnums=(0, 1)))
        jax.block_until_ready((fwd(v, x), bwd(v, x)))
        totals["infer"] += depth * float(np.median([timed(fwd, v, x) for _ in range(3 * rounds)]))
        totals["train"] += depth * float(np.median([timed(bwd, v, x) for _ in range(3 * rounds)]))
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
        f"stvit_small, batch {args.batch}, {args.img_size}x{args.img_size}, float32",
        flush=True,
    )
    x = jax.random.normal(jax.random.key(0), (args.batch, args.img_size, args.img_size, 3))
    y = jnp.arange(args.batch) % 1000
    modes = ("full", "pool_unpool", "no_sta", "no_attention")
    runs = {}
    for mode in modes:
        t = time.perf_counter()
        with ablated(mode):
            model = jvit.create_model("stvit_small", num_classes=1000, img_size=args.img_size, drop_path_rate=0.1)
            variables = jvit.init_variables(model, 0)
            infer, train = steps(model, x, y)
            jax.block_until_ready((infer(variables), train(variables, jax.random.key(1))))
        print(f"  {mode}: initialised and compiled in {time.perf_counter() - t:.0f} s", flush=True)
        runs[mode] = (infer, train, variables)

    times = {m: {"infer": [], "train": []} for m in modes}
    for _ in range(args.rounds):
        for mode, (infer, train, variables) in runs.items():
            times[mode]["infer"].append(timed(infer, variables))
            times[mode]["train"].append(timed(train, variables, jax.random.key(1)))
    med = {m: {k: float(np.median(v)) for k, v in t.items()} for m, t in times.items()}
    alone = sta_alone(args.batch, args.img_size, args.rounds)

    print(f"\nmedian step time over {args.rounds} interleaved rounds (ms):")
    print(f"  {'version':14s} {'inference':>10s} {'train':>10s}")
    for mode in modes:
        print(f"  {mode:14s} {med[mode]['infer'] * 1e3:10.1f} {med[mode]['train'] * 1e3:10.1f}")
    print("\nshare of the full step:")
    for kind in ("infer", "train"):
        full = med["full"][kind]
        share = {m: (full - med[m][kind]) / full for m in modes[1:]}
        print(
            f"  {kind:5s}: super-token STA (stages 1-2, ablation) {share['no_sta']:6.1%} | "
            f"association part only (vs pool/unpool) {share['pool_unpool']:6.1%} | "
            f"all attention incl. global MHSA of stages 3-4 {share['no_attention']:6.1%} | "
            f"STA modules timed alone {alone[kind] / full:6.1%} ({alone[kind] * 1e3:.1f} ms)"
        )


if __name__ == "__main__":
    main()
