#!/usr/bin/env bash
# Guidance-scale sweeps of the trained models -> docs/results.md (the article's trade-off, measured).
#   RUNS=/work/runs N=500 STEPS=25 bash benchmarks/results.sh
# Needs MODEL (default RUNS/cfg: class-conditional eps-model with a null class), CLF (default RUNS/clf:
# noise-aware classifier) and JUDGE (default RUNS/judge: condiff train-judge). The two sweeps run in
# parallel, one thread each; OUT (default RUNS/sweeps) keeps the samples, so a rerun reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/work/runs}
N=${N:-500}
STEPS=${STEPS:-25}
OUT=${OUT:-$RUNS/sweeps}
MODEL=${MODEL:-$RUNS/cfg}
CLF=${CLF:-$RUNS/clf}
JUDGE=${JUDGE:-$RUNS/judge}
CONDIFF=${CONDIFF:-.venv/bin/condiff}
mkdir -p "$OUT"
common=(--n "$N" --steps "$STEPS" --judge "$JUDGE" --no-progress --device cpu)
OMP_NUM_THREADS=1 "$CONDIFF" sweep --ckpt "$MODEL" --method cfg --scales 0,1,2,4 --out "$OUT/cfg" \
  "${common[@]}" > "$OUT.cfg.log" 2>&1 &
cfg_pid=$!
OMP_NUM_THREADS=1 "$CONDIFF" sweep --ckpt "$MODEL" --method classifier --classifier "$CLF" \
  --scales 0,1,2,4,8 --out "$OUT/classifier" "${common[@]}" > "$OUT.classifier.log" 2>&1 &
clf_pid=$!
wait "$cfg_pid"
wait "$clf_pid"
mkdir -p docs/results
for m in cfg classifier; do
  cp "$OUT/$m/sweep.png" "docs/results/$m-sweep.png"
  for g in "$OUT/$m"/grid-scale-*.png; do cp "$g" "docs/results/$m-$(basename "$g")"; done
done
{
  echo "# Results: guidance scale against condition accuracy, fidelity and diversity"
  echo
  echo "Made by \`benchmarks/results.sh\` (N=$N samples per scale, DDIM-$STEPS): eps-model \`$MODEL\`,"
  echo "noise-aware classifier \`$CLF\`, judge \`$JUDGE\` (test accuracy"
  echo "$(python3 -c "import json,sys;print(round(json.load(open(sys.argv[1]))['test_accuracy'],4))" "$JUDGE/judge.json"))."
  echo
  for m in cfg classifier; do
    sed -e 's/^# /## /' -e '/^Files: /d' "$OUT/$m/results.md"
    echo "![$m sweep](results/$m-sweep.png)"
    echo
    echo "Samples (one row per class) at each scale: $(for g in docs/results/$m-grid-scale-*.png; do
      b=$(basename "$g" .png); printf '[%s](results/%s.png) ' "${b#$m-grid-}" "$b"; done)"
    echo
  done
} > docs/results.md
echo "wrote docs/results.md"
