"""Explanations under load: /explain latency, and what concurrent explanations cost /predict.

For each model (seed-cnn and fast, random weights: speed does not depend on them), starts
`cifarlab serve MODEL --port 0` and runs, each for T seconds after a warm-up:
  A. C clients posting one CIFAR-10 JPEG at a time to /predict        -> requests/s
  B. C clients posting to /explain                                     -> p50/p99 latency
  C. A's C /predict clients and, at the same time, C /explain clients  -> /predict requests/s
and reports C's /predict rate as a share of A's (the issue asks for at least 80%).
Clients share the CPU with the server. Usage: python bench/explain_load.py [--clients 16]
[--seconds 30]. Writes bench/results/explain_load.json.
"""

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import save
from load_test import BOUNDARY, jpegs, multipart, start_server

from cifarlab.core.runtime import cpu_name


def random_checkpoint(recipe: str, folder: Path) -> Path:
    from cifarlab import config
    from cifarlab.core import checkpoint
    from cifarlab.models import build_model

    classes = "airplane automobile bird cat deer dog frog horse ship truck".split()
    spec = config.load_recipe(recipe)["model"]
    model, pre = build_model(spec, len(classes), 32, pretrained=False)
    path = folder / f"{recipe}-random.pt"
    checkpoint.save_model(path, model, spec, classes, {**pre, "image_size": 32})
    return path


async def clients(url: str, route: str, bodies: list[bytes], n: int, until: float) -> dict:
    """n clients posting to `route` until `until`; latencies of 200s, count of others."""
    latencies, errors = [], 0
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=120))
            for _ in range(n)
        ]

        async def one(i: int) -> None:
            nonlocal errors
            k = i
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                r = await sessions[i].post(route, content=bodies[k % len(bodies)], headers=headers)
                k += n
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(one(i) for i in range(n)))
    return {"done": len(latencies), "errors": errors, "latencies": latencies}


def summary(result: dict, seconds: float) -> dict:
    lat = np.array(result["latencies"]) * 1000
    return {
        "requests_per_s": result["done"] / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "errors": result["errors"],
    }


async def measure(url: str, bodies: list[bytes], n: int, seconds: float) -> dict:
    warm = time.perf_counter() + 3
    await asyncio.gather(
        clients(url, "/predict", bodies, n, warm), clients(url, "/explain", bodies, 2, warm)
    )
    until = time.perf_counter() + seconds
    alone = summary(await clients(url, "/predict", bodies, n, until), seconds)
    until = time.perf_counter() + seconds
    explain = summary(await clients(url, "/explain", bodies, n, until), seconds)
    until = time.perf_counter() + seconds
    both = await asyncio.gather(
        clients(url, "/predict", bodies, n, until), clients(url, "/explain", bodies, n, until)
    )
    mixed = {"predict": summary(both[0], seconds), "explain": summary(both[1], seconds)}
    ratio = mixed["predict"]["requests_per_s"] / alone["requests_per_s"]
    return {"predict_alone": alone, "explain_alone": explain, "mixed": mixed, "ratio": ratio}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--recipes", default="seed-cnn,fast")
    args = ap.parse_args()
    images, source = jpegs(256)
    bodies = [multipart(i, data) for i, data in enumerate(images)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            proc, url = start_server(random_checkpoint(recipe, Path(tmp)), 32, 2.0)
            try:
                results[recipe] = asyncio.run(measure(url, bodies, args.clients, args.seconds))
            finally:
                proc.terminate()
                proc.wait(30)
            r = results[recipe]
            print(
                f"{recipe}: /explain p50 {r['explain_alone']['p50_ms']:.0f} ms, p99 "
                f"{r['explain_alone']['p99_ms']:.0f} ms ({r['explain_alone']['requests_per_s']:.1f}"
                f"/s); /predict {r['predict_alone']['requests_per_s']:.0f}/s alone, "
                f"{r['mixed']['predict']['requests_per_s']:.0f}/s beside explanations "
                f"({r['ratio']:.0%})",
                flush=True,
            )
    save(
        "explain_load",
        {
            "cpu": cpu_name(),
            "clients": args.clients,
            "seconds": args.seconds,
            "images": source,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
