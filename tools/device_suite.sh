#!/usr/bin/env bash
# The accelerator check, one script (at most about 8 minutes on one H100/H200):
#   bash tools/device_suite.sh [OUT_DIR]
# 1. bf16 train steps of sot_small, stvit_small, spvit_s and hvt_s_1 (the trainer's own step, tools/benchmark.py)
#    at the largest batch that fits: batches from large to small under remat=block (the least memory: one try
#    per batch finds the largest that fits at all), then remat none and dots at that batch; the fastest that
#    fits is the model's figure. Each try prints the step's compile time, FLOPs, achieved TFLOP/s, MFU against
#    the chip's bf16 peak and the compiled step's XLA memory (temp = activations, also per image). The tries
#    share JVIT_BUDGET_S seconds (default 360) among the models.
# 2. tests/test_models.py's accelerator-only check that remat='block' shrinks a compiled train step's temp memory
#    (XLA:CPU does not show it).
# 3. the ORIGINAL model's train step under AMP on the same GPU (tools/bench_original_amp.py), when the
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
BATCHES=(1024 512 256 128 64)
BUDGET=${JVIT_BUDGET_S:-360}

# One try: the benchmark's JSON line in $OUT/<tag>.json, its result line echoed; fails when it does not fit.
try() {  # model batch remat
  local log="$OUT/jvit_$1_b$2_$3"
  if timeout 180 python tools/benchmark.py --model "$1" --train --dtype bfloat16 --remat "$3" \
      --batch "$2" --steps 10 --warmup 2 --json >"$log.out" 2>"$log.err"; then
    tail -n 1 "$log.out" >"$log.json"
    echo "jvit $1 batch=$2 remat=$3: $(grep '^result:' "$log.out")"
  else
    echo "jvit $1 batch=$2 remat=$3: did not fit or failed ($(tail -n 1 "$log.err" | cut -c1-120))"
    return 1
  fi
}
img_per_s() { python -c "import json, sys; print(json.load(open(sys.argv[1]))['img_per_s'])" "$1"; }

left=${#MODELS[@]}
for model in "${MODELS[@]}"; do
  # Each model may use an equal share of what is left of the budget (time a quick model saves goes to the rest).
  deadline=$((SECONDS + (BUDGET - SECONDS) / left))
  left=$((left - 1))
  for batch in "${BATCHES[@]}"; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "jvit $model: its share of the budget is spent"; break; }
    # remat=block needs the least memory: the largest batch it fits is the largest that fits at all.
    try "$model" "$batch" block || continue
    best="$OUT/jvit_${model}_b${batch}_block.json"
    # The faster policies at that batch, as time allows; the fastest that fits is the model's figure.
    for remat in none dots; do
      [ "$SECONDS" -lt "$deadline" ] || break
      if try "$model" "$batch" "$remat"; then
        cand="$OUT/jvit_${model}_b${batch}_${remat}.json"
        if python -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" \
            "$(img_per_s "$cand")" "$(img_per_s "$best")"; then best=$cand; fi
      fi
    done
    cp "$best" "$OUT/jvit_${model}.json"
    break
  done
  [ -f "$OUT/jvit_${model}.json" ] || echo "jvit $model: no configuration fitted"
done

timeout 120 python -m pytest -q -p no:cacheprovider tests/test_models.py -k compiled_train_step_memory 2>&1 | tail -n 3

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
print(f"\n{'model':12s} {'batch':>5s} {'remat':>5s} {'jvit img/s':>10s} {'MFU':>6s} {'temp MiB/img':>12s} "
      f"{'orig img/s':>10s} {'ratio':>6s}")
for m in models:
    j, o = load(f"jvit_{m}.json"), load(f"original_{m}.json")
    ratio = f"{j['img_per_s'] / o['img_per_s']:.2f}x" if j and o else "-"
    print(f"{m:12s} {j.get('batch', '-')!s:>5s} {j.get('remat', '-')!s:>5s} {j.get('img_per_s', '-')!s:>10s} "
          f"{j.get('mfu', '-')!s:>6s} {j.get('xla_temp_mib_per_image', '-')!s:>12s} {o.get('img_per_s', '-')!s:>10s} "
          f"{ratio:>6s}")
EOF
