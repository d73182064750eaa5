"""Where does a jvit step's time go? A per-fusion profile of the compiled train (or inference) step.

    python tools/profile_step.py --model hvt_s_1 --batch 8 --train      # the trainer's train step
    python tools/profile_step.py --model spvit_s --batch 8              # eval forward
    XLA_FLAGS=--xla_cpu_use_xnnpack=false python tools/profile_step.py --model hvt_ti_1 --train

The step is built exactly as ``tools/benchmark.py`` builds it (the trainer's jitted step from
``jvit.train.loop.setup`` / ``compiled_steps`` with ``--train``, ``model.apply`` otherwise), compiled
once and timed; then ``--trace-steps`` steps run under ``jax.profiler``. On XLA:CPU every executed
thunk (a fusion, a library call, a copy, ...) is one trace event named after its HLO instruction, so
the trace, joined with the optimized HLO (``compiled.as_text()``), says per instruction:

* milliseconds per step (summed over the thunk's executions; thunks that run concurrently on the
  executor's threads are each counted in full, so the column can add up to more than the wall time);
* the FLOPs per step of the dots and convolutions inside it (from the HLO shapes, times its executions)
  and the GFLOP/s it reached;
* what it is (fusion kind or opcode, output shape) and where it comes from: the innermost jvit /
  flax / optax source line of its root op (the HLO's stack-frame metadata).

A second table sums the same times by source line. The header gives the median step time, the
step's FLOPs (``compiled.cost_analysis()``) and the implied GFLOP/s. XLA options go through the
``XLA_FLAGS`` environment variable, read when jax starts.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import math
import os
import re
import statistics
import tempfile
import time

import jax
from jax.profiler import ProfileData

_BENCHMARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py")
_spec = importlib.util.spec_from_file_location("jvit_tools_benchmark", _BENCHMARK)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

# Trace events of the executor's own bookkeeping, not HLO instructions.
_NOT_THUNKS = re.compile(r"::|^end: |^\$")


# ---------------------------------------------------------------------------------------------
# The optimized HLO: instructions, their shapes, FLOPs and source lines
# ---------------------------------------------------------------------------------------------


class Instruction(collections.namedtuple("Instruction", "name shape opcode operands attrs computation")):
    """One HLO instruction of ``compiled.as_text()`` (``attrs`` is the raw text after the operands)."""


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[int, str]]:
    """Every instruction of the module by name, and each stack frame id's ``file:line function`` chain."""
    instructions, computation = {}, None
    files, functions, locations, frames = {}, {}, {}, {}
    section = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and re.match(r"^\d+ ", line):
            key, value = line.split(" ", 1)
            if section == "FileNames":
                files[int(key)] = value.strip('"')
            elif section == "FunctionNames":
                functions[int(key)] = value.strip('"')
            elif section == "FileLocations":
                f = dict(re.findall(r"(\w+)=(\d+)", value))
                locations[int(key)] = (int(f["file_name_id"]), int(f["function_name_id"]), int(f["line"]))
            else:
                f = dict(re.findall(r"(\w+)=(\d+)", value))
                frames[int(key)] = (int(f["file_location_id"]), int(f["parent_frame_id"]))
            continue
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            section, computation = None, header.group(1)
            continue
        m = re.match(r"^\s+(?:ROOT )?%(\S+) = ", line)
        if not m:
            continue
        rest = line[m.end() :]
        if rest.startswith("("):
            end = _matching(rest, 0)
            shape, rest = rest[:end], rest[end + 1 :]
        else:
            shape, rest = rest.split(" ", 1)
        op = re.match(r"([\w-]+)\(", rest)
        if not op:
            continue
        close = _matching(rest, op.end() - 1)
        operands = re.findall(r"%([\w.-]+)", rest[op.end() : close - 1])
        instructions[m.group(1)] = Instruction(m.group(1), shape, op.group(1), operands, rest[close:], computation)

    def chain(frame_id: int) -> list[str]:
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            file_id, function_id, line = locations[loc]
            out.append(f"{files[file_id]}:{line} {functions[function_id]}")
            frame_id = parent
        return out

    return instructions, {i: chain(i) for i in frames}


def dims(shape: str) -> list[int]:
    """``[8, 197, 384]`` from ``f32[8,197,384]{2,1,0}`` (the first array of a tuple shape)."""
    m = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def instruction_flops(ins: Instruction, by_name: dict[str, Instruction]) -> float:
    """Multiply-add FLOPs (x2) of a dot or convolution, 0 for anything else."""
    if ins.opcode == "dot":
        lhs = dims(by_name[ins.operands[0]].shape)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
        return 2.0 * math.prod(dims(ins.shape)) * k
    if ins.opcode == "convolution":
        rhs = dims(by_name[ins.operands[1]].shape)
        labels = re.search(r"dim_labels=\w+_(\w+)->", ins.attrs)
        out_features = rhs[labels.group(1).index("o")] if labels else 1
        return 2.0 * math.prod(dims(ins.shape)) * math.prod(rhs) / max(out_features, 1)
    return 0.0


def called(ins: Instruction) -> list[str]:
    """Computations an instruction runs (fusion bodies, while bodies, custom-call computations)."""
    return re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%([\w.-]+)", ins.attrs)


def nested_flops(ins: Instruction, by_name: dict[str, Instruction], members: dict[str, list[Instruction]]) -> float:
    """FLOPs of ``ins`` and of every computation it calls, recursively."""
    total = instruction_flops(ins, by_name)
    for comp in called(ins):
        total += sum(nested_flops(i, by_name, members) for i in members.get(comp, []))
    return total


def source(ins: Instruction, frames: dict[int, list[str]]) -> str:
    """The innermost jvit (else flax/optax/jax) source line of the instruction's op."""
    m = re.search(r"stack_frame_id=(\d+)", ins.attrs)
    stack = frames.get(int(m.group(1)), []) if m else []
    for package in ("/jvit/", "/flax/", "/optax/", "/jax/"):
        for frame in stack:
            if package in frame:
                return frame.split(package, 1)[1] if package != "/jvit/" else "jvit/" + frame.split("/jvit/", 1)[1]
    op = re.search(r'op_name="([^"]+)"', ins.attrs)
    return op.group(1)[-60:] if op else "?"


def describe(ins: Instruction) -> str:
    """``fusion kind`` or opcode, and the output shape."""
    kind = re.search(r'"kind":"(\w+)"', ins.attrs) or re.search(r"kind=(\w+)", ins.attrs)
    what = f"{ins.opcode}:{kind.group(1).lstrip('_')}" if ins.opcode == "fusion" and kind else ins.opcode
    if ins.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
        what = f"custom-call:{target.group(1)}" if target else what
    shape = re.sub(r"\{[^}]*\}", "", ins.shape)  # without layouts
    return f"{what} {shape[:40]}"


# ---------------------------------------------------------------------------------------------
# The trace
# ---------------------------------------------------------------------------------------------


def thunk_times(trace_dir: str) -> dict[str, tuple[float, int]]:
    """Per thunk name: (total seconds, executions) over the whole trace."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if not _NOT_THUNKS.search(event.name):
                    totals[event.name][0] += event.duration_ns * 1e-9
                    totals[event.name][1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--train", action="store_true", help="profile the trainer's train step (default: inference)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--trace-steps", type=int, default=3, help="steps run under the profiler")
    p.add_argument("--top", type=int, default=15, help="rows per table")
    p.add_argument("--hlo-out", default=None, help="write the optimized HLO text here")
    p.add_argument(
        "--scan", action="store_true", help="scanned blocks (as tools/benchmark.py --scan; step FLOPs then undercount)"
    )
    p.add_argument("--plain", action="store_true", help="with --train: the originals' step (tools/benchmark.py)")
    args = p.parse_args(argv)

    bargs = benchmark.parse_args(
        ["--model", args.model, "--batch", str(args.batch), "--dtype", args.dtype]
        + (["--img-size", str(args.img_size)] if args.img_size else [])
        + (["--train"] if args.train else [])
        + (["--scan"] if args.scan else [])
        + (["--plain"] if args.plain else [])
    )
    step_fn, state, inputs, params, _ = benchmark.build(bargs)
    t = time.perf_counter()
    compiled = step_fn.lower(state, inputs).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    hlo = compiled.as_text()
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(hlo)

    state, out = compiled(state, inputs)  # warmup
    jax.block_until_ready(out)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, out = compiled(state, inputs)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.trace_steps):
            state, out = compiled(state, inputs)
            jax.block_until_ready(out)
        jax.profiler.stop_trace()
        thunks = thunk_times(trace_dir)

    by_name, frames = parse_hlo(hlo)
    members: dict[str, list[Instruction]] = collections.defaultdict(list)
    for ins in by_name.values():
        members[ins.computation].append(ins)
    n = args.trace_steps
    median = statistics.median(times)
    step_flops = cost.get("flops", 0.0)
    busy = sum(s for s, _ in thunks.values()) / n
    print(
        f"{args.model} {'train' if args.train else 'inference'} batch {args.batch} {args.dtype}, "
        f"jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n"
        f"params {params:,}; compile {compile_s:.1f} s; step median {median * 1e3:.1f} ms "
        f"(min {min(times) * 1e3:.1f}, {args.steps} steps); step FLOPs (cost analysis"
        f"{', a scanned loop body counted once' if args.scan else ''}) {step_flops / 1e9:.2f} G "
        f"-> {step_flops / median / 1e9:.1f} GFLOP/s; thunk time {busy * 1e3:.1f} ms/step over {len(thunks)} thunks"
    )

    rows = []
    for name, (seconds, count) in thunks.items():
        ins = by_name.get(name)
        # Per step: a thunk inside a scanned loop body runs once per iteration.
        flops = nested_flops(ins, by_name, members) * count / n if ins else 0.0
        rows.append(
            (seconds / n, count / n, flops, describe(ins) if ins else "?", source(ins, frames) if ins else "?", name)
        )
    rows.sort(reverse=True)
    print(f"\ntop {args.top} thunks (ms/step summed over executions; % of all thunk time):")
    print(f"  {'ms':>8s} {'%':>5s} {'calls':>5s} {'GFLOP':>7s} {'GFLOP/s':>7s}  {'thunk':28s} {'what':52s} source")
    for ms, calls, flops, what, src, name in rows[: args.top]:
        rate = f"{flops / ms / 1e9:7.1f}" if flops and ms else f"{'':7s}"
        print(
            f"  {ms * 1e3:8.2f} {ms / busy:5.1%} {calls:5.0f} {flops / 1e9:7.3f} {rate}  {name[:28]:28s} "
            f"{what[:52]:52s} {src}"
        )

    by_source: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for ms, _, flops, _, src, _ in rows:
        by_source[src][0] += ms
        by_source[src][1] += flops
        by_source[src][2] += 1
    print(f"\ntop {args.top} source lines (their thunks summed):")
    print(f"  {'ms':>8s} {'%':>5s} {'thunks':>6s} {'GFLOP':>7s} {'GFLOP/s':>7s}  source")
    for src, (ms, flops, k) in sorted(by_source.items(), key=lambda kv: -kv[1][0])[: args.top]:
        rate = f"{flops / ms / 1e9:7.1f}" if flops and ms else f"{'':7s}"
        print(f"  {ms * 1e3:8.2f} {ms / busy:5.1%} {k:6d} {flops / 1e9:7.3f} {rate}  {src}")


if __name__ == "__main__":
    main()
