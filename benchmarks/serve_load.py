"""Load test of ``bgremoval serve`` on loopback: N concurrent clients, M requests.

Starts ``bgremoval serve`` in a child process (``--model``, default the published U2-NetP), waits
for ``/readyz``, sends ``--warmup`` requests, then ``--requests`` requests from ``--clients``
threads, each a synthetic product JPEG of ``--width``×``--height`` posted as the raw body. Prints
img/s, latency p50/p95/max, the status codes, and the server's resident memory (VmRSS) after the
warm-up and after the run: a server that leaks grows with the requests.

    .venv/bin/python benchmarks/serve_load.py [--clients 4] [--requests 100] [--model pretrained]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from process_memory import proc_status_mib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import httpx  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    return proc_status_mib("VmRSS", pid) or 0.0


def photos(n: int, width: int, height: int) -> list[bytes]:
    """``n`` synthetic product JPEGs of exactly ``width``×``height``."""
    from tasks.dev.synth import SynthConfig, encode_jpeg, render_item

    config = SynthConfig(n=n, seed=5, max_side=max(width, height))
    return [encode_jpeg(cv2.resize(render_item(i, config).image, (width, height))) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pretrained")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2, help="the server's --concurrency")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=1333)
    args = parser.parse_args(argv)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tasks.cli", "serve", "--model", args.model, "--port", str(port),
                               "--concurrency", str(args.concurrency)], cwd=PROJECT,
                              env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"the server did not become ready: {server.stderr.read() if server.poll() else ''}")
        images = photos(8, args.width, args.height)
        print(f"{httpx.get(f'{url}/readyz').json()['model']}")
        print(f"{args.clients} clients, {args.requests} requests of {args.width}x{args.height} JPEGs, "
              f"server concurrency {args.concurrency}, {len(os.sched_getaffinity(0))} cores, "
              f"load {os.getloadavg()[0]:.2f}")
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(args.clients) as pool:
            def one(i: int) -> tuple[int, float]:
                start = time.perf_counter()
                code = client.post(f"{url}/api/remove", content=images[i % len(images)]).status_code
                return code, time.perf_counter() - start

            list(pool.map(one, range(args.warmup)))
            rss_before = _rss_mb(server.pid)
            start = time.perf_counter()
            results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
            rss_after = _rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    latencies = sorted(t for _, t in results)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    codes = Counter(code for code, _ in results)
    print(f"\n{'img/s':>6} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} {'codes':<16} {'RSS before':>11} {'RSS after':>10}")
    print(f"{len(results) / wall:>6.2f} {statistics.median(latencies) * 1000:>7.0f} {p95 * 1000:>7.0f} "
          f"{latencies[-1] * 1000:>7.0f} {str(dict(codes)):<16} {rss_before:>9.0f} MB {rss_after:>7.0f} MB")
    print(f"load at end {os.getloadavg()[0]:.2f}")
    return 0 if set(codes) == {200} else 1


if __name__ == "__main__":
    sys.exit(main())
