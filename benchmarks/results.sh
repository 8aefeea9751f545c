#!/usr/bin/env bash
# Guidance-scale sweeps of the shipped models -> docs/results.md (the article's trade-off, measured).
#
#   bash benchmarks/results.sh                        # N=1000 samples per setting, DDIM-25, every method
#   N=200 METHODS="cfg classifier" bash benchmarks/results.sh
#
# Models: MODEL (class-conditional eps-model with a null class; its null branch is the unconditional
# model), CLF (noise-aware classifier), TEXT and IMAGE (encoders), JUDGE (independent judge); by
# default the ones shipped in src/condiff/models. Two lanes run in parallel, one thread each; OUT
# keeps every sample set, so a rerun with the same settings reuses them. Similarity guidance is
# sampled with DDIM eta = 1 (docs/similarity.md); the text sweep steers each sample toward the prompt
# "a photo of <class>", and benchmarks/similarity_eval.py adds the held-out paraphrases.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-src/condiff/models}
MODEL=${MODEL:-$MODELS/fashion-cfg}
CLF=${CLF:-$MODELS/fashion-classifier}
TEXT=${TEXT:-$MODELS/fashion-text-encoder}
IMAGE=${IMAGE:-$MODELS/fashion-image-encoder}
JUDGE=${JUDGE:-$MODELS/fashion-judge}
N=${N:-1000}
STEPS=${STEPS:-25}
OUT=${OUT:-runs/results}
CONDIFF=${CONDIFF:-.venv/bin/condiff}
PYTHON=${PYTHON:-.venv/bin/python}
METHODS=${METHODS:-cfg classifier text image}
declare -A SCALES=([cfg]=${CFG_SCALES:-0,1,2,4} [classifier]=${CLF_SCALES:-0,4,16,32}
                   [text]=${TEXT_SCALES:-0,100,300} [image]=${IMAGE_SCALES:-0,30,100})
declare -A EXTRA=([cfg]="" [classifier]="--classifier $CLF" [text]="--eta 1 --option text_encoder=$TEXT"
                  [image]="--eta 1 --option image_encoder=$IMAGE")
mkdir -p "$OUT"

wanted() { [[ " $METHODS " == *" $1 "* ]]; }

sweep() {  # sweep METHOD: one guidance family at its scales
  wanted "$1" || return 0
  echo "[$(date +%H:%M:%S)] sweep $1 at ${SCALES[$1]}"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 "$CONDIFF" sweep --ckpt "$MODEL" --method "$1" --scales "${SCALES[$1]}" --out "$OUT/$1" \
    --n "$N" --sampler ddim --steps "$STEPS" --judge "$JUDGE" --no-progress --device cpu ${EXTRA[$1]} > "$OUT/$1.log" 2>&1
}

held_out() {  # text guidance on held-out paraphrases; image guidance on 500 random test references, prior 0 and 1
  wanted text || wanted image || return 0
  if [ -f "$OUT/similarity.json" ]; then echo "reusing $OUT/similarity.json (delete it to measure again)"; return 0; fi
  echo "[$(date +%H:%M:%S)] similarity_eval"
  local enc=()
  wanted text && enc+=(--text-encoder "$TEXT" --text-scales "${HELD_OUT_TEXT_SCALES:-100,300}")
  wanted image && enc+=(--image-encoder "$IMAGE" --image-scales "${HELD_OUT_IMAGE_SCALES:-100}")
  OMP_NUM_THREADS=1 "$PYTHON" benchmarks/similarity_eval.py --ckpt "$MODEL" --judge "$JUDGE" "${enc[@]}" \
    --per-prompt 40 --refs-per-class 50 --per-ref 2 --eta 1 --steps "$STEPS" --out "$OUT/similarity.json" \
    > "$OUT/similarity.log" 2>&1
}

( sweep cfg && sweep text ) &
lane_a=$!
( sweep classifier && sweep image && held_out ) &
lane_b=$!
wait "$lane_a"
wait "$lane_b"

mkdir -p docs/results
judge_acc=$(grep -ao "test accuracy (held-out split): [0-9.]*" "$JUDGE/README.md" | grep -o "[0-9.]*$" || echo "?")
{
  echo "# Results: guidance scale against condition accuracy, fidelity and diversity"
  echo
  echo "Made by \`benchmarks/results.sh\` (N=$N samples per scale, DDIM-$STEPS; similarity guidance with eta 1):"
  echo "eps-model \`$MODEL\`, noise-aware classifier \`$CLF\`, encoders \`$TEXT\` and \`$IMAGE\`,"
  echo "judge \`$JUDGE\` (test accuracy $judge_acc; it shares nothing with the guidance networks)."
  echo
  echo "Summary: judge accuracy at the first scale and at its best, the lowest FID_fm, and diversity (relative"
  echo "to real data) from the smallest to the largest scale: relevance rises and diversity falls as the scale"
  echo "grows (the article's trade-off). The recommended scale (the default, \`condiff.compose.DEFAULT_SCALES\`;"
  echo "docs/which-method.md) balances the two: the lowest FID_fm unless accuracy is still clearly rising."
  echo
  echo "| method | scales | judge accuracy: first scale -> best (at scale) | lowest FID_fm (at scale) | diversity / real: first -> last scale |"
  echo "|---|---|---|---|---|"
  for m in $METHODS; do
    [ -f "$OUT/$m/results.json" ] || continue
    "$PYTHON" - "$OUT/$m/results.json" "$m" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
best = max(rows, key=lambda r: r["judge_accuracy"])
fid = min(rows, key=lambda r: r["fid_fm"])
scales = ", ".join("%g" % r["scale"] for r in rows)
print("| %s | %s | %.3f -> %.3f (%g) | %.2f (%g) | %.2f -> %.2f |" % (sys.argv[2], scales,
      rows[0]["judge_accuracy"], best["judge_accuracy"], best["scale"], fid["fid_fm"], fid["scale"],
      rows[0]["diversity_ratio"], rows[-1]["diversity_ratio"]))
PY
  done
  echo
  if [ -f docs/results/recommended.md ]; then  # written by hand from the numbers below: kept across reruns
    cat docs/results/recommended.md
    echo
  fi
  for m in $METHODS; do
    [ -f "$OUT/$m/results.md" ] || continue
    rm -f "docs/results/$m"-grid-scale-*.png  # grids of scales this run did not sample
    cp "$OUT/$m/sweep.png" "docs/results/$m-sweep.png"
    for g in "$OUT/$m"/grid-scale-*.png; do cp "$g" "docs/results/$m-$(basename "$g")"; done
    sed -e 's/^# /## /' -e '/^Files: /d' "$OUT/$m/results.md"
    echo "![$m sweep](results/$m-sweep.png)"
    echo
    echo "Samples (one row per class) at each scale: $(for g in $(printf '%s\n' docs/results/$m-grid-scale-*.png | sort -V); do
      b=$(basename "$g" .png); printf '[%s](results/%s.png) ' "${b#"$m"-grid-}" "$b"; done)"
    echo
  done
  if [ -f "$OUT/similarity.log" ]; then
    echo "## Similarity guidance on held-out prompts and references (benchmarks/similarity_eval.py)"
    echo
    echo '```'
    grep -a -v "^text gamma=[0-9.]* " "$OUT/similarity.log" | grep -av "^wrote" || true
    echo '```'
    echo
    cp "$OUT/similarity.json" docs/results/similarity.json
    echo "Per prompt and per reference class: [similarity.json](results/similarity.json)."
  fi
} > docs/results.md
echo "wrote docs/results.md"
