"""Bounded load test of `cifarlab serve` on loopback: with micro-batching and without.

Starts the server in a subprocess (`cifarlab serve MODEL --port 0`), then N concurrent async
clients (httpx) each POST one real CIFAR-10 JPEG at a time to /predict for T seconds (after a
short warm-up). Reports requests/s, p50/p90/p99 latency, errors (any non-200 or transport
failure), the server's resident memory at start/middle/end, and the model calls the server made
(/health), for `--max-batch B` and for `--max-batch 1` (batching off); then the ratio.
MODEL defaults to a seed-cnn checkpoint with random weights (speed does not depend on them).
The clients share the CPU with the server: on a small machine they cap the figures.
Usage: python bench/load_test.py [MODEL] [--clients 64] [--seconds 60] [--max-batch 32]
Writes bench/results/load_test.json (--name NAME: NAME.json).
"""

import argparse
import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import SHARED_DATA, save


def jpegs(n: int) -> tuple[list[bytes], str]:
    """n JPEG files as bytes: the first of the shared CIFAR-10 archive, else synthetic ones."""
    if SHARED_DATA.is_file():
        out = []
        with tarfile.open(SHARED_DATA, "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(".jpg"):
                    out.append(tar.extractfile(member).read())
                    if len(out) == n:
                        break
        return out, f"CIFAR-10 JPEGs ({SHARED_DATA.name})"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out, "synthetic JPEGs"


def default_model(folder: Path) -> Path:
    """A seed-cnn checkpoint with random weights and the ten CIFAR-10 classes."""
    from cifarlab import config
    from cifarlab.core import checkpoint
    from cifarlab.models import build_model

    classes = "airplane automobile bird cat deer dog frog horse ship truck".split()
    spec = config.load_recipe("seed-cnn")["model"]
    model, pre = build_model(spec, len(classes), 32, pretrained=False)
    path = folder / "seed-cnn-random.pt"
    checkpoint.save_model(path, model, spec, classes, {**pre, "image_size": 32})
    return path


BOUNDARY = "cifarlab-load-test"


def multipart(i: int, data: bytes) -> bytes:
    """A multipart/form-data body with one image in the field `file`."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{i}.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def start_server(model: Path, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "cifarlab", "serve", str(model), "--port", "0"]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--no-access-log"]
    log = tempfile.TemporaryFile("w+")  # uvicorn's own log, shown only if the server fails
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+?)/ ", line)
    if not match:
        proc.kill()
        log.seek(0)
        raise SystemExit(f"server did not start: {line!r}\n{log.read()[-2000:]}")
    url = match.group(1)
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not answer /health")


async def hammer(url: str, images: list[bytes], clients: int, seconds: float, pid: int) -> dict:
    """`clients` loops posting one image each until the deadline; latencies of finished ones."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    rss = {"idle": rss_mb(pid)}
    series: list[float] = []
    bodies = [multipart(i, data) for i, data in enumerate(images)]  # encoded once, not per call
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60))
        # one connection per client, as with independent users (a shared pool costs more CPU)
        sessions = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60))
            for _ in range(clients)
        ]

        async def client(i: int, until: float, record: bool) -> None:
            k = i
            while time.perf_counter() < until:
                body = bodies[k % len(bodies)]
                k += clients
                t0 = time.perf_counter()
                try:
                    r = await sessions[i].post("/predict", content=body, headers=headers)
                    ok = r.status_code == 200
                    why = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                if record:
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors[why] = errors.get(why, 0) + 1

        async def sample_memory(t_end: float) -> None:
            """RSS every half second; `middle` at half time, `series` every tenth of the run."""
            t_start, samples = time.perf_counter(), []
            while time.perf_counter() < t_end:
                samples.append((time.perf_counter() - t_start, rss_mb(pid)))
                await asyncio.sleep(0.5)
            rss["middle"] = min(samples, key=lambda s: abs(s[0] - seconds / 2))[1]
            rss["peak"] = max(mb for _, mb in samples)
            step = max(1, len(samples) // 10)
            series.extend(round(mb, 1) for _, mb in samples[::step])

        warm = time.perf_counter() + min(3.0, seconds / 10)
        await asyncio.gather(*(client(i, warm, False) for i in range(clients)))
        before = (await http.get("/health")).json()
        rss["start"] = rss_mb(pid)  # after the warm-up: allocator arenas and caches are in place
        cpu0 = (cpu_seconds(pid), time.process_time())
        t0 = time.perf_counter()
        until = t0 + seconds
        await asyncio.gather(
            sample_memory(until), *(client(i, until, True) for i in range(clients))
        )
        elapsed = time.perf_counter() - t0
        server_cpu = cpu_seconds(pid) - cpu0[0]
        client_cpu = time.process_time() - cpu0[1]
        after = (await http.get("/health")).json()
    rss["end"] = rss_mb(pid)
    lat = np.array(latencies) * 1000
    calls = after["batches"] - before["batches"]
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            q: round(float(np.percentile(lat, p)), 1) if len(lat) else None
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "server_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "server_rss_mb_series": series,
        "cpu_ms_per_request": {
            "server": round(1000 * server_cpu / max(len(latencies), 1), 2),
            "client": round(1000 * client_cpu / max(len(latencies), 1), 2),
        },
        "model_calls": calls,
        "mean_batch": round((after["images"] - before["images"]) / max(calls, 1), 2),
        "seconds": round(elapsed, 1),
    }


def run_mode(model, images, args, max_batch: int) -> dict:
    proc, url = start_server(model, max_batch, args.max_wait_ms)
    try:
        result = asyncio.run(hammer(url, images, args.clients, args.seconds, proc.pid))
    finally:
        proc.terminate()
        proc.wait(30)
    result = {"max_batch": max_batch, "max_wait_ms": args.max_wait_ms, **result}
    lat = result["latency_ms"]
    print(
        f"max_batch {max_batch:>3}: {result['requests_per_s']:7.1f} req/s  "
        f"p50 {lat['p50']} ms  p99 {lat['p99']} ms  errors {result['errors']}  "
        f"mean batch {result['mean_batch']}  CPU ms/request {result['cpu_ms_per_request']}  "
        f"RSS MB {result['server_rss_mb']}",
        flush=True,
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="run directory, checkpoint or .onnx file")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0, help="measured time per mode")
    p.add_argument("--max-batch", type=int, default=32, help="the batched mode's limit")
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--images", type=int, default=256, help="distinct images to cycle through")
    p.add_argument("--name", default="load_test", help="results file bench/results/NAME.json")
    args = p.parse_args()
    images, source = jpegs(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else default_model(Path(tmp))
        load_before = os.getloadavg()
        batched = run_mode(model, images, args, args.max_batch)
        unbatched = run_mode(model, images, args, 1)
    ratio = batched["requests_per_s"] / max(unbatched["requests_per_s"], 1e-9)
    print(f"micro-batching vs none: x{ratio:.2f} requests/s")
    save(
        args.name,
        {
            "what": "cifarlab serve on loopback, concurrent clients posting one JPEG each",
            "model": str(args.model or "seed-cnn checkpoint, random weights"),
            "images": source,
            "clients": args.clients,
            "seconds_per_mode": args.seconds,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "batched": batched,
            "unbatched": unbatched,
            "ratio_requests_per_s_batched_vs_unbatched": round(ratio, 2),
        },
    )


if __name__ == "__main__":
    main()
