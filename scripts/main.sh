#!/usr/bin/env bash
# The main job: train the best from-scratch recipe for 15 minutes of this machine (--budget picks
# the model size and epochs that this CPU or GPU affords) and evaluate it on a held-out split.
# DATA defaults to 'cifar10' (downloaded from the official site); pass a local path on a machine
# without internet, e.g. ../shared/data/cifar10-jpeg-train.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-cifar10}
RECIPE=${RECIPE:-fast}
BUDGET=${BUDGET:-15m}
OUT=runs/main-$RECIPE
TEST_ARGS=()
[ "$DATA" = cifar10 ] && TEST_ARGS=(--test cifar10)
if [ -f "$OUT/last.pt" ] && [ ! -f "$OUT/metrics.json" ]; then
  .venv/bin/cifarlab train --resume "$OUT"
elif [ ! -f "$OUT/metrics.json" ]; then
  .venv/bin/cifarlab train --recipe "$RECIPE" --budget "$BUDGET" --data "$DATA" "${TEST_ARGS[@]}" --out "$OUT"
fi
.venv/bin/cifarlab evaluate "$OUT"
