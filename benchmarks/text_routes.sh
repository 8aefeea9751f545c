#!/usr/bin/env bash
# Issue 20: the article's two routes to text control, on the same held-out prompts, seeds and solver
# -> docs/text-to-image.md's table and grids.
#
#   bash benchmarks/text_routes.sh                  # N=1000 samples per row, DDIM-25 eta 1, two lanes
#   N=200 CFG_WS=0,2 SDG_SCALES=100 bash benchmarks/text_routes.sh
#
# Route 2 (DALL-E 2 / Imagen): the caption-conditional eps-model TEXT_CFG with classifier-free guidance
# w (eq 24), `condiff sweep --method text-cfg`. Route 1 (SDG): the class model's null branch (MODEL)
# steered by text similarity with the attribute-aligned noise-aware encoder ENCODER (eqs 11-15),
# `condiff sweep --method text`, with its caption prior (the default) and without it (prior 0), and once
# with CLASS_ENCODER (aligned with class captions only: what attribute captions buy).
# Every row samples the same held-out prompts (condiff.captions.heldout_prompts: phrasings and synonyms
# never seen in training, 100 per class) from the same initial noise (seed 0), with DDIM-25 eta 1 (the
# solver similarity guidance needs, docs/similarity.md); one extra row samples route 2 at eta 0 (its
# deterministic solver). Two more rows sample the same (class, attributes) combinations in training phrasings
# (--prompts train): what each route learned, apart from what MiniLM carries over to new words. OUT keeps every sample set: a rerun only re-scores. Writes OUT/table.md and
# copies the grids to docs/text-to-image/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-src/condiff/models}
MODEL=${MODEL:-$MODELS/fashion-cfg}
TEXT_CFG=${TEXT_CFG:-$MODELS/fashion-text-cfg}
ENCODER=${ENCODER:-$MODELS/fashion-text-attr-encoder}
CLASS_ENCODER=${CLASS_ENCODER:-$MODELS/fashion-text-encoder}  # aligned with class captions only
JUDGE=${JUDGE:-$MODELS/fashion-judge}
N=${N:-1000}
STEPS=${STEPS:-25}
CFG_WS=${CFG_WS:-0,1,2,4}
ETA0_W=${ETA0_W:-2}
SDG_SCALES=${SDG_SCALES:-100,300}
NOPRIOR_SCALE=${NOPRIOR_SCALE:-100}
OUT=${OUT:-runs/text-routes}
CONDIFF=${CONDIFF:-.venv/bin/condiff}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"

sweep() {  # sweep NAME ARGS...: one `condiff sweep` on the held-out prompts (PROMPTS=train: training phrasings)
  local name=$1; shift
  echo "[$(date +%H:%M:%S)] $name: condiff sweep $* --prompts ${PROMPTS:-heldout}"
  OMP_NUM_THREADS=1 "$CONDIFF" sweep "$@" --prompts "${PROMPTS:-heldout}" --n "$N" --sampler ddim --steps "$STEPS" \
    --judge "$JUDGE" --out "$OUT/$name" --no-progress --device cpu > "$OUT/$name.log" 2>&1
  echo "[$(date +%H:%M:%S)] $name: done"
}

LANES=${LANES:-a b}  # a: route 2, b: route 1; LANES=b samples route 1 only (e.g. while TEXT_CFG trains)
lane() { [[ " $LANES " == *" $1 "* ]]; }

( lane a || exit 0
  sweep text-cfg --ckpt "$TEXT_CFG" --method text-cfg --scales "$CFG_WS" --eta 1
  sweep text-cfg-eta0 --ckpt "$TEXT_CFG" --method text-cfg --scales "$ETA0_W" --eta 0
  PROMPTS=train sweep text-cfg-seen --ckpt "$TEXT_CFG" --method text-cfg --scales "$ETA0_W" --eta 1 ) &
lane_a=$!
( lane b || exit 0
  sweep sdg --ckpt "$MODEL" --method text --scales "$SDG_SCALES" --eta 1 --option "text_encoder=$ENCODER"
  sweep sdg-noprior --ckpt "$MODEL" --method text --scales "$NOPRIOR_SCALE" --eta 1 \
    --option "text_encoder=$ENCODER" --option text_prior=0
  sweep sdg-class-encoder --ckpt "$MODEL" --method text --scales "$NOPRIOR_SCALE" --eta 1 \
    --option "text_encoder=$CLASS_ENCODER"
  PROMPTS=train sweep sdg-seen --ckpt "$MODEL" --method text --scales "$NOPRIOR_SCALE" --eta 1 \
    --option "text_encoder=$ENCODER" ) &
lane_b=$!
wait "$lane_a"
wait "$lane_b"
[ "$LANES" = "a b" ] || exit 0  # the table needs both routes

"$PYTHON" - "$OUT" "$ETA0_W" "$NOPRIOR_SCALE" <<'PY'
import json, shutil, sys
from pathlib import Path

out = Path(sys.argv[1])
GRIDS = {"text-cfg": float(sys.argv[2]), "text-cfg-seen": float(sys.argv[2]), "sdg": float(sys.argv[3]),
         "sdg-seen": float(sys.argv[3]), "sdg-class-encoder": float(sys.argv[3])}  # the grids the docs show
docs = Path("docs/text-to-image")
docs.mkdir(parents=True, exist_ok=True)
parts = [("text-cfg", "text CFG (route 2), w = {s:g}"), ("text-cfg-eta0", "text CFG (route 2), w = {s:g}, eta 0"),
         ("sdg", "text similarity (route 1, SDG), gamma = {s:g}"),
         ("sdg-noprior", "text similarity (route 1, SDG), gamma = {s:g}, no caption prior"),
         ("sdg-class-encoder", "text similarity (route 1, SDG), gamma = {s:g}, encoder aligned with class captions only"),
         ("text-cfg-seen", "*training phrasings*: text CFG (route 2), w = {s:g}"),
         ("sdg-seen", "*training phrasings*: text similarity (route 1, SDG), gamma = {s:g}")]
lines, real = [], None
for name, label in parts:
    d = json.loads((out / name / "results.json").read_text())
    st = d["settings"]
    if not lines:
        attrs = [k for k in d["rows"][0] if k.startswith("attr_")]
        lines = [f"{st['n']} samples per row, held-out prompts unless marked, seed {st['seed']}, "
                 f"{st['sampler']}-{st['steps']}; judge `{st.get('judge', 'shipped')}`.", "",
                 "| route, setting | eta | judge acc | " + " | ".join(a[5:] for a in attrs)
                 + " | FID_fm | div / real | s / image |", "|---|---:|---:|" + "---:|" * (len(attrs) + 3)]
    for r in d["rows"]:
        cells = " | ".join(f"{r[a]:.3f}" if r.get(a) is not None else "" for a in attrs)
        lines.append(f"| {label.format(s=r['scale'])} | {st['eta']:g} | {r['judge_accuracy']:.3f} | {cells} | "
                     f"{r['fid_fm']:.2f} | {r['diversity_ratio']:.2f} | {r['seconds_per_image']:.3f} |")
        tag = f"{r['scale']:g}"
        src = out / name / f"grid-scale-{tag}.png"
        if src.is_file() and name in GRIDS and r["scale"] == GRIDS[name]:
            shutil.copy(src, docs / f"{name}-{tag}.png")
    real = d["rows"][0]
lines.append(f"| real data (training images) | | {real['judge_accuracy_real']:.3f} | {' | ' * len(attrs)}"
             f"{real['fid_fm_floor']:.2f} | 1.00 | |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"wrote {out / 'table.md'}; grids in {docs}/")
PY
