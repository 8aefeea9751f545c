#!/usr/bin/env bash
# The recipe of the models shipped in src/condiff/models: trains each one on Fashion-MNIST,
# then exports it with a model card.
#
#   bash scripts/train_shipped.sh                 # every stage, two lanes in parallel, then export
#   bash scripts/train_shipped.sh cfg             # one stage: cfg | cfg-v1 | clf | clean | judge | enc-image | enc-text | export | export-cfg | export-clf
#   bash scripts/train_shipped.sh text-cfg export-text-cfg   # text to image by CFG (after export: it starts from fashion-cfg)
#   bash scripts/train_shipped.sh enc-text-attr export-enc-text-attr   # text guidance with attribute captions
#   RUNS=/tmp/runs DEVICE=cuda bash scripts/train_shipped.sh
#
# Lane A trains the eps-model (the slow one); lane B trains the classifier, the clean classifier and
# the two encoders one after the other. Each lane uses THREADS threads (default 1: on a 2-core CPU two
# one-thread lanes beat one two-thread lane); when lane B is done, the eps-model is stopped and resumed
# with 2 x THREADS threads (both cores). Every stage checkpoints every few minutes and resumes from
# RUNS/<stage> when rerun, so a cut-off recipe just runs again. Logs: RUNS/<stage>.log.
#
# Recipe v3 (docs/training.md): the eps-model predicts v (converted to eps at load, condiff.prediction)
# and trains 6000 steps with min-SNR-5 loss weighting, stratified t, cosine lr decay to the last step
# and post-hoc EMA profiles (whose early snapshots give the weak model of autoguidance); the clean
# classifier and the encoders with cosine lr decay (unchanged since v2); the noise-aware classifier with a
# constant lr, as in v1 (release 3.1: it guides better so). The judge is not retrained: it
# measures every release and guides none. Stage cfg-v1 is the first release's eps-model recipe, kept
# for the comparison in docs/training.md.
#
# Measured wall times on the 2-core AVX2 CPU are in each model card and in docs/training.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
DEVICE=${DEVICE:-auto}
THREADS=${THREADS:-1}
CONDIFF=${CONDIFF:-.venv/bin/condiff}
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-runs/results}  # benchmarks/results.sh output: its sweep results go into the model cards
DEST=${DEST:-src/condiff/models}

# The exact commands, also recorded in each model card ("condiff" stands for $CONDIFF).
CMD_CFG="train --out $RUNS/cfg --steps ${CFG_STEPS:-6000} --batch-size 128 --channels 64,96 --blocks 1 --lr 1e-3 --warmup 100 --ema-decay 0.999 --p-uncond 0.1 --ckpt-every 100 --seed 0 --min-snr-gamma 5 --t-sampling stratified --lr-schedule cosine --ema-profiles 0.05,0.1 --prediction v"
CMD_CFG_V1="train --out $RUNS/cfg-v1 --steps 1500 --batch-size 128 --channels 64,96 --blocks 1 --lr 1e-3 --warmup 100 --ema-decay 0.999 --p-uncond 0.1 --ckpt-every 100 --seed 0"
# The noise-aware classifier keeps a constant lr after warm-up: with cosine decay (releases 2 and 3.0) it guided worse
# with DDIM eta 0 at every gamma, and no better with the default SDE solver (docs/training.md, "The classifier's
# learning-rate schedule").
CMD_CLF="train-classifier --out $RUNS/clf --steps 3000 --channels 48,96 --ckpt-every 250 --seed 0"
CMD_CLEAN="train-classifier --clean --out $RUNS/clean-clf --steps 1000 --channels 48,96 --ckpt-every 250 --seed 0 --lr-schedule cosine"
CMD_JUDGE="train-judge --out $RUNS/judge --steps 1200 --seed 0"
CMD_ENC_IMAGE="train-encoder --kind image --out $RUNS/enc-image --clean-steps 4000 --steps 2000 --ema-decay 0.995 --ckpt-every 100 --seed 1 --lr-schedule cosine"
CMD_ENC_TEXT="train-encoder --kind text --init $RUNS/enc-image --out $RUNS/enc-text --steps 1500 --ema-decay 0.995 --ckpt-every 100 --seed 0 --lr-schedule cosine"
# Text to image by CFG (issue 20): the caption-conditional eps-model, fine-tuned from the shipped class model
# ($DEST/fashion-cfg, so run it after `export`): every weight copied, the null embedding from its null class, the
# caption projection fitted to its class embeddings. Captions with pixel attributes (condiff.captions), MiniLM
# embeddings computed once into RUNS/text-cfg/captions.safetensors. Not part of the default lanes. It predicts
# what fashion-cfg predicts (--prediction defaults to the --init model's: v since recipe v3). The shipped one stays
# the model fine-tuned from recipe v2's fashion-cfg: fine-tuned from v3 (basic or rich captions) it followed the
# attributes less (docs/text-to-image.md, "Release 3.1: a richer vocabulary and the v3 class model").
# Sized to <= 35 min on one thread here: 1300 steps at 1.2-1.5 s/step (the text model costs what the class model
# does: 1.23 vs 1.21-1.28 CPU s/step measured side by side, batch 128) plus about 2 min to embed the captions.
CMD_TEXT_CFG="train --cond text --init $DEST/fashion-cfg --out $RUNS/text-cfg --steps ${TEXT_CFG_STEPS:-1300} --batch-size 128 --channels 64,96 --blocks 1 --lr 5e-4 --warmup 50 --ema-decay 0.998 --p-uncond 0.1 --ckpt-every 100 --seed 0 --min-snr-gamma 5 --t-sampling stratified --lr-schedule cosine"
# Text similarity guidance that steers attributes too (issue 20, the SDG route): enc-text's recipe, with E1 aligned
# to captions of each image's class and pixel attributes (66 combinations; 1,452 captions in the stored bank).
CMD_ENC_TEXT_ATTR="train-encoder --kind text --captions attributes --init $RUNS/enc-image --out $RUNS/enc-text-attr --steps 1500 --ema-decay 0.995 --ckpt-every 100 --seed 0 --lr-schedule cosine"
WEAK_STEP=${WEAK_STEP:-3000}  # autoguidance's weak model: the eps-model run's post-hoc EMA snapshot at this step (half way)

stage() {  # stage NAME COMMAND...: run one training command, log its output and wall time
  local name=$1; shift
  local start=$SECONDS
  mkdir -p "$RUNS"
  echo "[$(date +%H:%M:%S)] $name: condiff $*"
  OMP_NUM_THREADS=$THREADS "$CONDIFF" "$@" --device "$DEVICE" --no-progress >> "$RUNS/$name.log" 2>&1
  echo "[$(date +%H:%M:%S)] $name: done in $((SECONDS - start)) s (this invocation; the card reads the run's log)"
}

metrics() {  # the card's measured results of stage $1: its log's last "held-out ..." line, and the sweeps
  local line
  line=$(grep -a "^held-out" "$RUNS/$1.log" 2>/dev/null | tail -1 || true)
  if [ -n "$line" ]; then printf -- '--metric\n%s=%s\n' "${line%%:*}" "${line#*: }"; fi
  local sweep
  case $1 in cfg) sweep=cfg ;; text-cfg) sweep=text-cfg ;; clf) sweep=classifier ;; enc-text) sweep=text ;; enc-image) sweep=image ;; *) sweep= ;; esac
  if [ -n "$sweep" ] && [ -f "$RESULTS/$sweep/results.json" ]; then  # benchmarks/results.sh, if it has run
    "$PYTHON" - "$RESULTS/$sweep/results.json" "$sweep" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
st, rows = d["settings"], d["rows"]
print("--metric")
print("judge accuracy by %s scale (%d samples each, %s-%d, eta %g%s)=%s" % (sys.argv[2], rows[0]["n"], st["sampler"],
      st["steps"], st["eta"], ", %s prompts" % st["prompts"] if st.get("prompts") else "",
      ", ".join("%g: %.3f" % (r["scale"], r["judge_accuracy"]) for r in rows)))
PY
  fi
  case $1 in
    text-cfg|enc-text-attr) printf -- '--metric\nguidance results=docs/text-to-image.md (benchmarks/text_routes.sh)\n' ;;
    *) printf -- '--metric\nguidance results=docs/results.md and docs/similarity.md (benchmarks/results.sh)\n' ;;
  esac
  if [ "$1" = cfg ] && [ -n "${CFG_WALL:-}" ]; then printf -- '--metric\nwall time=%s\n' "$CFG_WALL"; fi
}

export_one() {  # export_one STAGE FOLDER COMMAND
  local m
  mapfile -t m < <(metrics "$1")
  "$CONDIFF" export --ckpt "$RUNS/$1" --out "$DEST/$2" --command "condiff $3" "${m[@]}"
}

export_weak() {  # autoguidance's weak model: an early post-hoc EMA snapshot of the eps-model's own run
  local snap
  snap=$(printf '%s/cfg/posthoc-ema/step-%07d/sigma-0.050' "$RUNS" "$WEAK_STEP")
  "$CONDIFF" export --ckpt "$snap" --out "$DEST/fashion-cfg-weak" \
    --command "condiff $CMD_CFG  # the weak model: its post-hoc EMA snapshot $snap" \
    --metric "role=the weak model of autoguidance (condiff sample --autoguide) for fashion-cfg" \
    --metric "trained steps=$WEAK_STEP of the run's $(grep -o -- '--steps [0-9]*' <<< "$CMD_CFG" | cut -d' ' -f2) (post-hoc EMA, sigma_rel 0.05); the card's steps line is the run's target"
}

run_stage() {
  case $1 in
    cfg) stage cfg $CMD_CFG ;;
    cfg-v1) stage cfg-v1 $CMD_CFG_V1 ;;
    clf) stage clf $CMD_CLF ;;
    clean) stage clean-clf $CMD_CLEAN ;;
    judge) stage judge $CMD_JUDGE ;;
    enc-image) stage enc-image $CMD_ENC_IMAGE ;;
    enc-text) stage enc-text $CMD_ENC_TEXT ;;
    text-cfg) stage text-cfg $CMD_TEXT_CFG ;;
    export-cfg) export_one cfg fashion-cfg "$CMD_CFG"; export_weak ;;  # the eps-model and its weak model alone
    export-clf) export_one clf fashion-classifier "$CMD_CLF" ;;
    export-text-cfg) export_one text-cfg fashion-text-cfg "$CMD_TEXT_CFG" ;;
    enc-text-attr) stage enc-text-attr $CMD_ENC_TEXT_ATTR ;;
    export-enc-text-attr) export_one enc-text-attr fashion-text-attr-encoder "$CMD_ENC_TEXT_ATTR" ;;
    export)
      export_one cfg fashion-cfg "$CMD_CFG"
      export_one clf fashion-classifier "$CMD_CLF"
      export_one clean-clf fashion-clean-classifier "$CMD_CLEAN"
      export_weak
      export_one enc-image fashion-image-encoder "$CMD_ENC_IMAGE"
      export_one enc-text fashion-text-encoder "$CMD_ENC_TEXT"
      du -sh "$DEST" ;;
    *) echo "train_shipped.sh: unknown stage '$1' (cfg, cfg-v1, clf, clean, judge, enc-image, enc-text, export, export-cfg, export-clf, text-cfg, export-text-cfg, enc-text-attr, export-enc-text-attr)" >&2; exit 2 ;;
  esac
}

if [ $# -gt 0 ]; then
  for s in "$@"; do run_stage "$s"; done
  exit 0
fi

start=$SECONDS
( run_stage cfg ) &
lane_a=$!
( run_stage clf && run_stage clean && run_stage enc-image && run_stage enc-text ) &
lane_b=$!
wait "$lane_b"
# Both cores on the eps-model: once lane B is done, stop lane A (SIGTERM: it checkpoints and exits 0)
# and resume it with twice the threads (1.63x faster a step on the 2-core CPU, docs/training.md).
if kill -0 "$lane_a" 2>/dev/null; then
  echo "[$(date +%H:%M:%S)] lane B done: the eps-model resumes with $((THREADS * 2)) threads"
  pkill -TERM -P "$lane_a" || true
  wait "$lane_a" || true
  THREADS=$((THREADS * 2)) run_stage cfg
else
  wait "$lane_a"
fi
run_stage export
echo "recipe done in $((SECONDS - start)) s"
