"""How steady `auto`'s precision and memory-format check is on this machine: each trial is a
fresh process (as a run is: the first candidate timed meets the process's cold start) that times
`fast`'s base network the way `core/runtime.decide` does now (one untimed step per candidate,
then one timed step each in turn, MEASURE_ROUNDS rounds, compared by the median of per-round
ratios) and the way it did before (one candidate
after the other: one untimed step, then two timed), alternating. Then, in this process, the
reference: 1024-image training steps (the recipe's batch) in each candidate, interleaved,
median of 3 after one warm-up. Prints the rates and how often each way chose each candidate.

Usage: python bench/precision_check.py [--trials 8]

Writes bench/results/precision_check.json.
"""

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time

import torch
from common import save

from cifarlab import config
from cifarlab.core import runtime
from cifarlab.models import build_model
from cifarlab.training.step import train_step

TRIAL = """
import json, torch
from cifarlab import config
from cifarlab.core import runtime
from cifarlab.models import build_model
from cifarlab.training.step import train_step
threads = runtime.set_threads("auto")
recipe = config.load_recipe("fast")
net = build_model(recipe["model"], 10, 32)[0]
batch = runtime.probe_batch(32, recipe["train"]["batch_size"])
cpu = torch.device("cpu")
if WAY == "interleaved":
    choice = runtime.decide("auto", "auto", cpu, threads, model=net, batch=batch,
                            train_step=train_step)
    rates = {**choice.rates, "chosen": runtime._key(choice.bf16, choice.channels_last)}
else:  # one after the other, as before, and one reading each for the same rule
    bf16s = [False, True] if runtime.native_bf16()[0] else [False]
    candidates = [(b, c) for b in bf16s for c in (False, True)]
    rates = {}
    for bf16, cl in candidates:
        probe = runtime.StepProbe(net, 32, bf16, cl, batch, train_step)
        seconds = sum(batch / probe.rate() for _ in range(2))
        rates[runtime._key(bf16, cl)] = 2 * batch / seconds
    best = runtime.pick(candidates, {k: [r] for k, r in rates.items()})
    rates["chosen"] = runtime._key(*best)
print(json.dumps(rates))
"""


def trial(way: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", f"WAY = {way!r}\n{TRIAL}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def reference(repeat: int = 3) -> dict:
    """1024-image training steps of the base network in each candidate, in turn."""
    recipe = config.load_recipe("fast")
    net = build_model(recipe["model"], 10, 32)[0]
    bf16s = [False, True] if runtime.native_bf16()[0] else [False]
    probes = {
        runtime._key(b, c): runtime.StepProbe(net, 32, b, c, 1024, train_step)
        for b in bf16s
        for c in (False, True)
    }
    times = collections.defaultdict(list)
    for _ in range(repeat):
        for key, probe in probes.items():
            times[key].append(1024 / probe.rate())
    return {key: 1024 / statistics.median(t) for key, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    args = p.parse_args()
    runtime.set_threads("auto")
    trials = {"interleaved": [], "sequential": []}
    for i in range(args.trials):
        for way in ("interleaved", "sequential") if i % 2 == 0 else ("sequential", "interleaved"):
            started = time.perf_counter()
            rates = trial(way)
            trials[way].append({"rates": rates, "seconds": time.perf_counter() - started})
            print(way, json.dumps(rates), flush=True)
    ref = reference()
    summary = {}
    for way, rows in trials.items():
        keys = [k for k in rows[0]["rates"] if k != "chosen"]
        summary[way] = {
            "chosen": dict(collections.Counter(r["rates"]["chosen"] for r in rows)),
            "rates_min_median_max": {
                k: [
                    round(f(r["rates"][k] for r in rows), 1)
                    for f in (min, lambda v: statistics.median(list(v)), max)
                ]
                for k in keys
            },
        }
    summary["reference_1024_images_per_s"] = ref
    summary["reference_ratio"] = {k: round(v / ref["fp32/contiguous"], 3) for k, v in ref.items()}
    for way in trials:
        print(f"{way}: chose {summary[way]['chosen']}; {summary[way]['rates_min_median_max']}")
    print(f"reference (1024-image steps): {ref}, ratios {summary['reference_ratio']}")
    save(
        "precision_check",
        {"trials": trials, "summary": summary, "threads": torch.get_num_threads()},
    )


if __name__ == "__main__":
    main()
