#!/usr/bin/env bash
# The accelerator check, one script (about 8 minutes on one H100/H200):
#   bash tools/device_suite.sh [OUT_DIR]
# 1. bf16 train steps of sot_small, stvit_small, spvit_s and hvt_s_1 (the trainer's own step, tools/benchmark.py)
#    at the largest batch that fits; each prints the step's FLOPs, achieved TFLOP/s, MFU against the chip's
#    bf16 peak and activation memory per image. (A remat option is not built yet: see the open issue.)
# 2. the ORIGINAL model's train step under AMP on the same GPU (tools/bench_original_amp.py), when the
#    extracted original trees are in $JVIT_REF (ref_setup.sh's WORK_DIR; default .ref/ in the repo, which
#    a device run can carry: it is git-ignored and never committed) and torch sees a GPU.
# Figures only: a summary table of medians and the jvit / original ratio is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/device_suite}}
REF=${JVIT_REF:-.ref}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
python -c "import jax; print('devices:', jax.devices())"

MODELS=(sot_small stvit_small spvit_s hvt_s_1)
BATCHES=(512 384 256 192 128 96 64 32)

for model in "${MODELS[@]}"; do
  for batch in "${BATCHES[@]}"; do
    log="$OUT/jvit_${model}_b${batch}"
    if timeout 240 python tools/benchmark.py --model "$model" --train --dtype bfloat16 \
        --batch "$batch" --steps 10 --warmup 2 --json >"$log.out" 2>"$log.err"; then
      tail -n 1 "$log.out" >"$OUT/jvit_${model}.json"
      echo "jvit $model batch=$batch: $(grep '^result:' "$log.out")"
      break
    fi
    echo "jvit $model batch=$batch: did not fit or failed ($(tail -n 1 "$log.err" | cut -c1-120))"
  done
done

if [ -d "$REF/ref_sot" ] && python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  for model in "${MODELS[@]}"; do
    batch=$(python -c "import json; print(json.load(open('$OUT/jvit_${model}.json'))['batch'])" 2>/dev/null || echo 64)
    log="$OUT/original_${model}_b${batch}"
    if timeout 240 python tools/bench_original_amp.py --ref-dir "$REF" --variant "$model" --batch "$batch" \
        --json >"$log.out" 2>"$log.err"; then
      tail -n 1 "$log.out" >"$OUT/original_${model}.json"
      echo "original $model (AMP fp16) batch=$batch: $(grep '^result:' "$log.out")"
    else
      echo "original $model batch=$batch: failed ($(tail -n 1 "$log.err" | cut -c1-160))"
    fi
  done
else
  echo "originals: skipped (no extracted trees in $REF, or torch sees no GPU)"
fi

python - "$OUT" "${MODELS[@]}" <<'EOF'
import json, os, sys
out, models = sys.argv[1], sys.argv[2:]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.isfile(path) else {}
print(f"\n{'model':12s} {'batch':>5s} {'jvit img/s':>10s} {'MFU':>6s} {'MiB/img':>8s} {'orig img/s':>10s} {'ratio':>6s}")
for m in models:
    j, o = load(f"jvit_{m}.json"), load(f"original_{m}.json")
    ratio = f"{j['img_per_s'] / o['img_per_s']:.2f}x" if j and o else "-"
    print(f"{m:12s} {j.get('batch', '-')!s:>5s} {j.get('img_per_s', '-')!s:>10s} {j.get('mfu', '-')!s:>6s} "
          f"{j.get('train_activation_mib_per_image', '-')!s:>8s} {o.get('img_per_s', '-')!s:>10s} {ratio:>6s}")
EOF
