#!/usr/bin/env bash
# Create .venv and install cifarlab with everything it needs (pass --test for the test tools and
# the browser used by the browser tests). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The torch build this project is pinned to (also the one pip finds in a local cache, if any).
.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
if [ "${1:-}" = "--test" ]; then
  .venv/bin/pip install -q -e ".[serve,lite,test]"
  if ! command -v chromium >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  fi
else
  .venv/bin/pip install -q -e ".[serve,lite]"
fi
