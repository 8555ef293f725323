"""Images/s the data path delivers (batch augmentation included) vs the model's training
images/s, for a recipe. Usage: python bench/data_throughput.py [RECIPE]"""

import sys

from common import save

from cifarlab.bench import data_speed

if __name__ == "__main__":
    recipe = sys.argv[1] if len(sys.argv) > 1 else "seed-cnn"
    save(f"data_throughput-{recipe}", data_speed(recipe))
