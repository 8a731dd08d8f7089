"""Load test: ``GET /me`` with and without the cache, gunicorn workers on PostgreSQL + Redis.

Three services run side by side: no cache, the cache with its near cache (the default on
``redis://``), and the cache with ``ORMCACHE_NEAR_CACHE=false`` (a Redis round trip per
hit). They are measured in alternating rounds of fixed duration,
with wrk when it is installed (``apt-get install wrk``), else a bounded Python client
(threads with keep-alive sessions). Prints requests/s and p50/p99 latency per mode
(medians over rounds) and the throughput ratio, and writes ``results/load.md``.

Run: ``.venv/bin/python -m benchmarks.load_keyservice [--seconds 10 --workers 2 --rounds 3]``
"""

from __future__ import annotations

import argparse
import contextlib
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

import requests
from examples.keyservice.launch import running_service

from benchmarks.common import POSTGRES_URL, REDIS_URL, RESULTS


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
    """Drive the load with wrk (a C client, so the client does not eat the server's CPU).

    With no keys, requests carry no credentials: the service answers 401 before it looks
    anything up, which measures what gunicorn and Flask alone can serve here.
    """
    script = (
        'request = function()\n  return wrk.format("GET", "/me")\nend\n'
        if not keys
        else (
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
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating off/on measurements per mode"
    )
    args = parser.parse_args(argv)
    use_wrk = bool(shutil.which("wrk")) and not args.python_client
    client = "wrk (2 threads)" if use_wrk else "Python requests threads"
    modes = {
        "off": {"KEYSERVICE_CACHE": "off"},
        "on": {"KEYSERVICE_CACHE": "on"},
        "on, near cache off": {"KEYSERVICE_CACHE": "on", "ORMCACHE_NEAR_CACHE": "false"},
    }
    samples: dict[str, list[tuple[float, float, float, int]]] = {mode: [] for mode in modes}
    ceiling: list[float] = []
    with contextlib.ExitStack() as stack:
        # Both services stay up for the whole run and are measured in alternation, so
        # drift on a shared machine lands on both modes alike.
        bases: dict[str, tuple[str, list[str]]] = {}
        for mode, mode_env in modes.items():
            env = {
                "DATABASE_URL": POSTGRES_URL,
                "ORMCACHE_URL": REDIS_URL,
                "ORMCACHE_NAMESPACE": f"load-{uuid.uuid4().hex[:8]}",
                **mode_env,
            }
            print(f"starting {args.workers} workers, cache {mode} ...", file=sys.stderr, flush=True)
            base = stack.enter_context(
                running_service(env, workers=args.workers, threads=args.threads)
            )
            keys = []
            for i in range(args.keys):
                tag = uuid.uuid4().hex[:10]
                resp = requests.post(
                    f"{base}/users",
                    json={"name": f"load{i}", "email": f"{tag}@load.test"},
                    timeout=10,
                )
                keys.append(resp.json()["api_key"])
            bases[mode] = (base, keys)
        for r in range(args.rounds):
            for mode in modes:
                base, keys = bases[mode]
                hammer(base, keys, 1.0, args.clients)  # warm-up
                print(
                    f"  round {r + 1}/{args.rounds}, cache {mode}: measuring "
                    f"{args.seconds:.0f}s ...",
                    file=sys.stderr,
                    flush=True,
                )
                if use_wrk:
                    samples[mode].append(wrk(base, keys, args.seconds, args.clients))
                    if mode == "on":
                        print(
                            f"  round {r + 1}/{args.rounds}, no lookup (401): measuring "
                            f"{args.seconds:.0f}s ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        ceiling.append(wrk(base, [], args.seconds, args.clients)[0])
                else:
                    rps, lat, errors = hammer(base, keys, args.seconds, args.clients)
                    lat.sort()
                    p50 = statistics.median(lat) * 1e3
                    p99 = lat[int(len(lat) * 0.99) - 1] * 1e3
                    samples[mode].append((rps, p50, p99, errors))
        # Each answer is one worker's counters (whichever took the request).
        near_shares = []
        for _ in range(8):
            got = requests.get(f"{bases['on'][0]}/stats", timeout=10).json()
            if got["hits"]:
                near_shares.append(got["near_hits"] / got["hits"])
    rows = []
    for mode in modes:
        got = samples[mode]
        rows.append(
            f"| cache {mode} | {statistics.median(g[0] for g in got):,.0f} "
            f"| {statistics.median(g[1] for g in got):.2f} "
            f"| {statistics.median(g[2] for g in got):.2f} | {sum(g[3] for g in got)} "
            f"| {', '.join(f'{g[0]:,.0f}' for g in got)} |"
        )
    ratios = [on[0] / off[0] for off, on in zip(samples["off"], samples["on"])]
    rt_ratios = [on[0] / off[0] for off, on in zip(samples["off"], samples["on, near cache off"])]
    text = (
        f"`GET /me`, {args.workers} gunicorn workers x {args.threads} threads, PostgreSQL + Redis, "
        f"{args.clients} keep-alive connections from {client}; {args.rounds} alternating "
        f"rounds of {args.seconds:.0f} s per mode, medians\n\n"
        "| run | requests/s | p50 ms | p99 ms | non-200 | requests/s per round |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + f"\n\nthroughput ratio cached / uncached: {statistics.median(ratios):.2f}x "
        f"(median; per round: {', '.join(f'{x:.2f}x' for x in ratios)}); "
        f"with the near cache off: {statistics.median(rt_ratios):.2f}x\n"
        f"\nnear cache: near hits / hits per worker, as its /stats reported after the run: "
        f"{min(near_shares, default=0):.1%} to {max(near_shares, default=0):.1%}\n"
    )
    if ceiling:
        top = statistics.median(ceiling)
        off = statistics.median(g[0] for g in samples["off"])
        on = statistics.median(g[0] for g in samples["on"])
        rt = statistics.median(g[0] for g in samples["on, near cache off"])
        verdict = "met" if on / top >= 0.8 else "MISSED"
        text += (
            f"\nceiling: the same service answering `/me` with 401 before any lookup serves "
            f"{top:,.0f} requests/s (per round: {', '.join(f'{c:,.0f}' for c in ceiling)}), "
            f"{top / off:.2f}x the uncached rate: no cache can give "
            "more on this machine\n"
            f"\ncache on reaches {on / top:.0%} of the ceiling (goal >= 80%: {verdict}); "
            f"with the near cache off, {rt / top:.0%}\n"
        )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
