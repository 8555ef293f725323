"""Training and inference images/s, FLOPs per image and achieved GFLOP/s vs the matmul peak,
against a plain eager fp32 PyTorch loop in the same process; one row per size --budget may pick.
Usage: python bench/model_speed.py [RECIPE ...]"""

import sys

from common import save

from cifarlab.bench import model_speeds

if __name__ == "__main__":
    recipes = sys.argv[1:] or ["seed-cnn", "fast"]
    save("model_speed", {"results": [row for r in recipes for row in model_speeds(r)]})
