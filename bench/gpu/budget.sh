#!/bin/bash
# --budget on CUDA: does a 60 s budget end within +-10% when torch.compile's time lands in epoch 1?
# Usage (repository root, on a GPU machine): bash bench/gpu/budget.sh [DATA]
export PYTHONPATH=$PWD/src CIFARLAB_HOME=/tmp/clhome PYTHONUNBUFFERED=1
DATA=$(realpath "${1:-../shared/data/cifar10-jpeg-train.tar.gz}")
OUT=${OUT:-$PWD/bench/results}  # the device tool sets OUT; elsewhere results stay here
python3 -c "from cifarlab.data import load_images; load_images('$DATA', image_size=32)"  # decode once, as a second run would find it
for b in 60s; do
  s=$(date +%s.%N)
  python3 -m cifarlab train --recipe fast --budget $b --data $DATA --out /tmp/b$b --no-track --no-progress 2>&1 | grep -v "^train " | tee -a $OUT/budget.txt
  python3 -c "print('BUDGET $b cli wall', round($(date +%s.%N) - $s, 1), 's')" | tee -a $OUT/budget.txt
  cp /tmp/b$b/history.csv $OUT/history-$b.csv; cp /tmp/b$b/metrics.json $OUT/metrics-$b.json
done
