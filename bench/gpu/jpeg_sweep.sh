#!/bin/bash
# Which settings lift the wide size on the JPEG data, at the CPU 60m run's length (30 epochs).
# Usage (repository root, on a GPU machine): bash bench/gpu/jpeg_sweep.sh [DATA]
export PYTHONPATH=$PWD/src:$PWD/bench CIFARLAB_HOME=/tmp/clhome PYTHONUNBUFFERED=1
DATA=$(realpath "${1:-../shared/data/cifar10-jpeg-train.tar.gz}")
OUT=${OUT:-$PWD/bench/results}  # the device tool sets OUT; elsewhere results stay here
W="--set model.widths=[128,384,384] --set augment.cutout=12"
start=$(date +%s)
run() { name=$1; shift
  [ $(( $(date +%s) - start )) -gt 360 ] && { echo "skip $name"; return; }
  python3 bench/time_to_target.py --data $DATA --epochs 30 --name $name --runs /tmp/s-$name "$@" 2>&1 | grep -E "^train  30|val_accuracy\": 0" | tail -1
  python3 -c "import json;d=json.load(open('bench/results/time_to_target-$name.json'));r=d['runs'][0];print('RESULT $name', r['val_accuracy'], round(r['steady_seconds'],1))" | tee -a $OUT/sweep.txt
}
run base $W
run seed1 $W --set seed=1
run t4 $W --set augment.translate=4
run cutmix $W --set augment.cutmix=1.0 --set augment.mix_prob=0.5
run ls3 $W --set train.label_smoothing=0.3
run wd2 $W --set train.weight_decay=0.00266
run cut16 $W --set augment.cutout=16
run deep $W --set model.widths=[128,384,512] --set model.depth=3
run lr2 $W --set train.lr=2.25
run mom9 $W --set train.momentum=0.9
echo "done at $(( $(date +%s) - start )) s"
