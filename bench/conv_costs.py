"""Where a training step's time goes: every convolution of a recipe's model timed alone (forward,
input gradient, weight gradient) with its TFLOP/s, the step's share spent in convolutions, and the
fraction of the matmul peak a step would reach if nothing but the convolutions took time.
Usage: python bench/conv_costs.py [RECIPE ...]"""

import sys

from common import save

from cifarlab.bench import conv_costs

if __name__ == "__main__":
    save("conv_costs", {"results": [conv_costs(r) for r in sys.argv[1:] or ["fast"]]})
