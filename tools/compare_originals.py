"""jvit against the original PyTorch code on this machine, row by row, back to back: the speed table of issue 13.

    bash ../shared/tools/ref_setup.sh /work/.mirror /work/ref      # once: venv + the originals' trees
    python tools/compare_originals.py --ref /work/ref --markdown /tmp/compare.md

For each model (default: the issue's rows ``sot_tiny sot_small stvit_small spvit_s hvt_ti_1 hvt_s_1``) it runs

1. ``../shared/tools/bench_ref.py`` on the original (``--modes infer_b8 train_b8 --backends eager compile``,
   in the venv of ``--ref``), then, right after it,
2. ``tools/benchmark.py`` on jvit: inference (``model.apply``, eval mode) and the train step with
   ``--plain`` (the same work as the original's step: forward, loss, backward, AdamW; no in-step
   augmentation or EMA) plus ``--train-args`` (default none: unrolled blocks, as the trainer runs them and
   faster per step than ``--scan``, which compiles faster),

batch 8, 224 px (the variants' official size), float32, and prints one row per model: img/s medians, the
ratio of jvit to the better of the original's eager and ``torch.compile`` (>1: jvit is faster), and jvit's
train-step compile time. Figures only, no thresholds. Run it on a quiet machine: torch's OpenMP threads
and XLA's thread pool both collapse when anything else runs (absolute figures drift, which is why every row
is measured back to back). ``--inductor-cache DIR`` keeps torch.compile's cache between invocations (the
originals' first call then loads instead of compiling; first-call times are not part of the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("sot_tiny", "sot_small", "stvit_small", "spvit_s", "hvt_ti_1", "hvt_s_1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="the ref_setup.sh work dir: venv/ and ref_{sot,stvit,spvit,hvt}/")
    p.add_argument("--bench-ref", default=os.path.join(ROOT, "..", "shared", "tools", "bench_ref.py"))
    p.add_argument("--models", nargs="+", default=list(ROWS))
    p.add_argument("--train-args", default="", help="extra tools/benchmark.py arguments of the train step")
    p.add_argument("--infer-args", default="", help="extra tools/benchmark.py arguments of inference")
    p.add_argument("--steps", type=int, default=10, help="jvit's timed steps")
    p.add_argument("--ref-args", default="--warmup 2 --min-iters 5 --min-time 5", help="extra bench_ref.py arguments")
    p.add_argument("--inductor-cache", default=None, help="TORCHINDUCTOR_CACHE_DIR for the originals' compile runs")
    p.add_argument("--markdown", default=None, help="also write the table here")
    p.add_argument("--json", default=None, help="write every figure here")
    return p.parse_args(argv)


def run_original(args, model: str) -> dict[tuple[str, str], float]:
    """``{(mode, backend): img/s median}`` of the original ``model``; failed measurements are absent."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ref.json")
        cmd = [os.path.join(args.ref, "venv", "bin", "python"), args.bench_ref]
        for family in ("sot", "stvit", "spvit", "hvt"):
            cmd += [f"--repo-{family}", os.path.join(args.ref, f"ref_{family}")]
        cmd += ["--variants", model, "--modes", "infer_b8", "train_b8", "--backends", "eager", "compile"]
        cmd += ["--skip-matmul", "--skip-flops", "--out", out] + args.ref_args.split()
        if args.inductor_cache:
            cmd += ["--inductor-cache", args.inductor_cache]
        subprocess.run(cmd, check=False)
        if not os.path.exists(out):
            return {}
        with open(out) as f:
            summary = json.load(f).get("summary", [])
    return {(d["mode"], d["backend"]): d["img_s_median"] for d in summary if d.get("ok")}


def run_jvit(args, model: str, train: bool) -> dict:
    """The JSON figures of ``tools/benchmark.py`` (``{}`` when it failed)."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--model", model, "--batch", "8"]
    cmd += ["--steps", str(args.steps), "--json"]
    cmd += ["--train", "--plain", *args.train_args.split()] if train else args.infer_args.split()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        print(f"jvit {model} {'train' if train else 'inference'} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(lines[-1])


def ratio(ours: float | None, theirs: list[float | None]) -> str:
    best = max((t for t in theirs if t), default=None)
    return f"{ours / best:.2f}x" if ours and best else "n/a"


def fmt(v: float | None) -> str:
    return f"{v:.2f}" if v else "failed"


def main(argv=None) -> None:
    args = parse_args(argv)
    head = (
        "| model | jvit infer | orig eager | orig compile | infer ratio | jvit train | orig eager | orig compile "
        "| train ratio | jvit train compile s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    every = {}
    for model in args.models:
        print(f"== {model}: original", flush=True)
        ref = run_original(args, model)
        print(f"== {model}: jvit", flush=True)
        infer, train = run_jvit(args, model, train=False), run_jvit(args, model, train=True)
        every[model] = dict(original={f"{m}/{b}": v for (m, b), v in ref.items()}, jvit_infer=infer, jvit_train=train)
        ie, ic = ref.get(("infer_b8", "eager")), ref.get(("infer_b8", "compile"))
        te, tc = ref.get(("train_b8", "eager")), ref.get(("train_b8", "compile"))
        ji, jt = infer.get("img_per_s"), train.get("img_per_s")
        row = [model, fmt(ji), fmt(ie), fmt(ic), ratio(ji, [ie, ic]), fmt(jt), fmt(te), fmt(tc), ratio(jt, [te, tc])]
        row.append(f"{train['compile_s']:.1f}" if train else "failed")
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(every, f, indent=1)


if __name__ == "__main__":
    main()
