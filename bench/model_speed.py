"""Training and inference images/s, FLOPs per image and achieved GFLOP/s vs the matmul peak,
against a plain eager fp32 PyTorch loop in the same process.
Usage: python bench/model_speed.py [RECIPE ...]"""

import sys

from common import save

from cifarlab.bench import model_speed

if __name__ == "__main__":
    recipes = sys.argv[1:] or ["seed-cnn", "fast"]
    save("model_speed", {"results": [model_speed(r) for r in recipes]})
