"""Time the ORIGINAL PyTorch model's train step under automatic mixed precision, for the GPU side-by-side
of ``tools/device_suite.sh``.

    python tools/bench_original_amp.py --ref-dir /tmp/jvit-ref --variant sot_small --batch 128 --json

The model comes from ``../shared/tools/bench_ref.py``'s ``build_model`` (the original code, from the trees
``../shared/tools/ref_setup.sh`` extracts into ``--ref-dir``; none of it is part of jvit). One step is what
the originals' ``--amp`` training loops do: ``zero_grad``, forward and loss under ``torch.autocast``,
backward through a ``GradScaler`` (float16) and an AdamW step, on random images and labels already on the
device. Prints the configuration, then median/min/max step time, img/s and peak device memory; ``--json``
adds one JSON line. Figures only, no thresholds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench_ref(path: str):
    """The ``bench_ref`` module of ``../shared/tools`` (model builders of the original code)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found (pass --bench-ref, the shared tools' bench_ref.py)")
    spec = importlib.util.spec_from_file_location("bench_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-dir", required=True, help="ref_setup.sh's WORK_DIR: holds ref_sot/, ref_stvit/, ...")
    p.add_argument("--bench-ref", default=str(ROOT.parent / "shared" / "tools" / "bench_ref.py"))
    p.add_argument("--variant", required=True, help="a bench_ref.py variant, e.g. sot_small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="autocast dtype")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    bench_ref = load_bench_ref(args.bench_ref)
    repos = {name: os.path.join(args.ref_dir, f"ref_{name}") for name in ("sot", "stvit", "spvit", "hvt")}
    model, loss_fn, notes = bench_ref.build_model(args.variant, repos, train=True)
    device = torch.device(args.device)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    dtype = getattr(torch, args.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
    images = torch.randn(args.batch, 3, bench_ref.IMG, bench_ref.IMG, device=device)
    labels = torch.randint(0, bench_ref.NUM_CLASSES, (args.batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = loss_fn(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    config = dict(
        model=args.variant,
        batch=args.batch,
        mode="train",
        amp=args.dtype,
        device=str(device),
        torch=torch.__version__,
        notes=notes,
    )
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()), flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    median = statistics.median(times)
    figures = dict(
        step_ms_median=round(1e3 * median, 2),
        step_ms_min=round(1e3 * min(times), 2),
        step_ms_max=round(1e3 * max(times), 2),
        img_per_s=round(args.batch / median, 1),
        device_peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
    )
    print("result: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
    if args.json:
        print(json.dumps({**config, **figures}, default=str))


if __name__ == "__main__":
    main()
