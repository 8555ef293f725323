#!/bin/bash
# One GPU session: time to 94% for fast's sizes, then model speed. Everything lands in $OUT.
# Usage (repository root, on a GPU machine): bash bench/gpu/time_to_94.sh [DATA]
export PYTHONPATH=$PWD/src:$PWD/bench CIFARLAB_HOME=/tmp/clhome PYTHONUNBUFFERED=1
DATA=$(realpath "${1:-../shared/data/cifar10-jpeg-train.tar.gz}")
OUT=${OUT:-$PWD/bench/results}  # the device tool sets OUT; elsewhere results stay here
LOG=$OUT/log.txt
start=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - start) )); }
{
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv
python3 -c "import torch, timm; print(torch.__version__, timm.__version__, torch.cuda.get_device_name())"
python3 -c "from cifarlab.data import load_images; import time; t=time.time(); d=load_images('$DATA', image_size=32); print('decoded', d.images.shape, time.time()-t)"
echo "== small 10 epochs (airbench94's length)"
timeout $(left 150) python3 bench/time_to_target.py --data $DATA --epochs 10 --name h200-small --runs /tmp/r1
cp bench/results/time_to_target-h200-small.json $OUT/ 2>/dev/null
echo "== wide 20, 40 epochs"
timeout $(left 330) python3 bench/time_to_target.py --data $DATA --epochs 20 40 --name h200-wide --runs /tmp/r2 \
  --set 'model.widths=[128,384,384]' --set augment.cutout=12
cp bench/results/time_to_target-h200-wide.json $OUT/ 2>/dev/null
echo "== deep: 128/384/512 x3 convs, translate 4, 45 epochs"
timeout $(left 470) python3 bench/time_to_target.py --data $DATA --epochs 45 --name h200-deep --runs /tmp/r3 \
  --set 'model.widths=[128,384,512]' --set model.depth=3 --set augment.cutout=12 --set augment.translate=4
cp bench/results/time_to_target-h200-deep.json $OUT/ 2>/dev/null
echo "== model speed"
timeout $(left 530) python3 -c "
import json, sys
sys.path.insert(0, 'bench')
from common import save
from cifarlab.bench import model_speed
save('model_speed-h200', {'results': [model_speed('fast', steps=50, size=s) for s in (0, 1)]})
"
cp bench/results/model_speed-h200.json $OUT/ 2>/dev/null
echo "== done at $(( $(date +%s) - start )) s"
} 2>&1 | tee $LOG
