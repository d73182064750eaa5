"""Which mesh? Collectives, bytes moved and state bytes per device of the trainer's step, per mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/mesh_report.py --model sot_small

Builds the trainer's jitted train step for ``configs/<model>.py`` (mock data, global batch
``--batch``) on a data-parallel mesh (``data=N``) and an FSDP mesh (``fsdp=N``), compiles each
(nothing is allocated: the state and batch are abstract) and reads from the compiled per-device
HLO text: the number of all-reduce / all-gather / reduce-scatter / collective-permute / all-to-all
ops and the bytes of their results, the per-device state bytes (params, optimizer moments, EMA)
from the state shardings, and the FLOPs per image from XLA's cost analysis. A full-size step takes
minutes to compile on a small CPU machine; figures only, no thresholds.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from collections import Counter

import jax
import numpy as np

import jvit
from jvit.data import pipeline
from jvit.train import loop, sharding
from jvit.train.config import load_config_file

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s+([a-z][a-z0-9-]*)\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO shape string, tuples summed (``(f32[2,3]{1,0}, s32[])`` -> 28)."""
    return sum(
        _DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _SHAPE.findall(text)
    )


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """``{op: (count, result bytes)}`` over the HLO module text (async ``-start`` halves counted as the op).

    Result bytes are read from each op's own line: an all-reduce's result is its operand's size, an
    all-gather's the gathered array (``N`` times its operand), a reduce-scatter's one shard.
    """
    counts, nbytes = Counter(), Counter()
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        _, shape, op = m.groups()
        if op.endswith("-done"):  # the async pair's second half repeats the shape
            continue
        base = op.removesuffix("-start")
        if base in COLLECTIVES:
            counts[base] += 1
            nbytes[base] += _shape_bytes(shape)
    return {op: (counts[op], nbytes[op]) for op in COLLECTIVES}


def report(model: str, batch: int, meshes: dict[str, tuple[int, int]]) -> None:
    """Compile ``model``'s train step for each ``{name: (data, fsdp)}`` mesh and print its figures."""
    config = load_config_file(os.path.join(CONFIGS, f"{model}.py"), "mock")
    with config.unlocked():
        config.batch_size, config.grad_accum_steps = batch, 1
    for name, (data, fsdp) in meshes.items():
        with config.unlocked():
            config.mesh.data, config.mesh.fsdp = data, fsdp
        exp = loop.setup(config)
        abstract, shardings = exp.abstract_state, exp.state_shardings()
        train_fn, _ = loop.compiled_steps(exp)
        local = next(
            pipeline.train_iterator(
                exp.train_split.data, batch_size=batch, preprocess=exp.train_preprocess, seed=0, num_threads=1
            )
        )
        batch_sharding = sharding.batch_sharding(exp.mesh)
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in local.items()}
        abstract_state = exp.restore_target()
        t0 = time.time()
        compiled = train_fn.lower(abstract_state, abstract_batch).compile()
        seconds = time.time() - t0
        found = collectives(compiled.as_text())
        state_bytes = sum(
            math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
            for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
        )
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        per_image = cost.get("flops", float("nan")) * jax.device_count() / batch
        ops = ", ".join(f"{op} {n} ({b / 2**20:.1f} MiB)" for op, (n, b) in found.items() if n)
        total = sum(b for _, b in found.values())
        print(
            f"{model} mesh={name} (data={exp.mesh.shape['data']}, fsdp={exp.mesh.shape['fsdp']}) batch={batch}: "
            f"params {jvit.count_params(abstract.params):,}; state/device {state_bytes / 2**20:.1f} MiB; "
            f"collectives/step {total / 2**20:.1f} MiB of results: {ops or 'none'}; "
            f"train GFLOP/image {per_image / 1e9:.2f} (XLA cost analysis); compile {seconds:.0f} s",
            flush=True,
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=jvit.list_models(), metavar="NAME")
    p.add_argument("--batch", type=int, default=8, help="global batch (a multiple of the device count)")
    p.add_argument("--meshes", default="data,fsdp", help="comma list of 'data' (data=N) and 'fsdp' (fsdp=N)")
    args = p.parse_args(argv)
    n = jax.device_count()
    table = {"data": (n, 1), "fsdp": (1, n)}
    report(args.model, args.batch, {m: table[m] for m in args.meshes.split(",")})


if __name__ == "__main__":
    main()
