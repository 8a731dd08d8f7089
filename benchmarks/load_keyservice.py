"""Load test: ``GET /me`` with and without the cache, gunicorn workers on PostgreSQL + Redis.

A bounded Python client on loopback (threads with keep-alive sessions, fixed duration)
prints requests/s and p50/p99 latency for both runs, and their ratio.

Run: ``.venv/bin/python -m benchmarks.load_keyservice [--seconds 10 --workers 3]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
from examples.keyservice.launch import running_service

RESULTS = Path(__file__).parent / "results"
POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def hammer(
    base: str, keys: list[str], seconds: float, clients: int
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(n: int) -> None:
        session = requests.Session()
        mine: list[float] = []
        i = n
        while time.monotonic() < stop_at:
            key = keys[i % len(keys)]
            i += 1
            start = time.perf_counter()
            resp = session.get(f"{base}/me", headers={"Authorization": f"Bearer {key}"}, timeout=10)
            mine.append(time.perf_counter() - start)
            if resp.status_code != 200:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return len(latencies) / elapsed, latencies, errors[0]


def wrk(
    base: str, keys: list[str], seconds: float, clients: int
) -> tuple[float, float, float, int]:
    """Drive the load with wrk (a C client, so the client does not eat the server's CPU)."""
    script = (
        "keys = {"
        + ",".join(f'"{k}"' for k in keys)
        + "}\n"
        + (
            "i = 0\n"
            "request = function()\n"
            "  i = i + 1\n"
            '  local auth = "Bearer " .. keys[i % #keys + 1]\n'
            '  return wrk.format("GET", "/me", {["Authorization"] = auth})\n'
            "end\n"
        )
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s", f.name, base],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(f.name)

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rps, ms("50"), ms("99"), int(non2xx.group(1)) if non2xx else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument(
        "--python-client", action="store_true", help="use the Python client even if wrk exists"
    )
    args = parser.parse_args(argv)
    rows = []
    results = {}
    client = ""
    for mode in ("off", "on"):
        env = {
            "DATABASE_URL": POSTGRES_URL,
            "ORMCACHE_URL": REDIS_URL,
            "ORMCACHE_NAMESPACE": f"load-{uuid.uuid4().hex[:8]}",
            "KEYSERVICE_CACHE": mode,
        }
        print(f"starting {args.workers} workers, cache {mode} ...", file=sys.stderr, flush=True)
        with running_service(env, workers=args.workers, threads=args.threads) as base:
            keys = []
            for i in range(args.keys):
                tag = uuid.uuid4().hex[:10]
                resp = requests.post(
                    f"{base}/users",
                    json={"name": f"load{i}", "email": f"{tag}@load.test"},
                    timeout=10,
                )
                keys.append(resp.json()["api_key"])
            hammer(base, keys, 1.0, args.clients)  # warm-up
            print(f"  measuring {args.seconds:.0f}s ...", file=sys.stderr, flush=True)
            if shutil.which("wrk") and not args.python_client:
                client = "wrk (2 threads)"
                rps, p50, p99, errors = wrk(base, keys, args.seconds, args.clients)
            else:
                client = "Python requests threads"
                rps, lat, errors = hammer(base, keys, args.seconds, args.clients)
                lat.sort()
                p50 = statistics.median(lat) * 1e3
                p99 = lat[int(len(lat) * 0.99) - 1] * 1e3
        results[mode] = rps
        rows.append(f"| cache {mode} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {errors} |")
    text = (
        f"`GET /me`, {args.workers} gunicorn workers x {args.threads} threads, PostgreSQL + Redis, "
        f"{args.clients} keep-alive connections from {client}, {args.seconds:.0f} s per run\n\n"
        "| run | requests/s | p50 ms | p99 ms | non-200 |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + f"\n\nthroughput ratio cached / uncached: {results['on'] / results['off']:.2f}x\n"
    )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
