"""asyncio hit costs, measured in one run on the same data (run from the repository root):

    .venv/bin/python -m benchmarks.bench_async

Cases, all awaited on one event loop:

* the floor: a raw ``redis.asyncio`` GET of ormcache's payload plus ``msgpack.unpackb``;
* an ``async def`` memoized lookup hit, on Redis with the near cache (the default for
  ``redis://``), on Redis without it (``near_cache=False``: a round trip per hit), and
  in memory;
* a ``FromCache`` hit on a live ``AsyncSession``, the same three ways;
* the uncached query on the same ``AsyncSession`` (PostgreSQL through psycopg's async
  driver), the thing the cache saves.

Cases run interleaved, batch by batch (about ``--batch-ms`` of one case per batch), and
the figures are medians, as in ``bench_hits``. Writes ``benchmarks/results/async.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import redis.asyncio as aioredis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from benchmarks.bench_hits import NEAR, ROUND_TRIP, BenchUser, goal, key_hash, prepare
from benchmarks.common import POSTGRES_URL, REDIS_URL, RESULTS
from ormcache import Cache, FromCache

Case = Callable[[], Awaitable[object]]


async def measure(cases: list[tuple[str, Case]], batches: int, batch_ms: float) -> dict[str, float]:
    calls: dict[str, int] = {}
    for label, fn in cases:
        start = time.perf_counter()
        for _ in range(50):
            await fn()
        per_call = (time.perf_counter() - start) / 50
        calls[label] = max(100, int(batch_ms / 1000 / per_call))
    samples: dict[str, list[float]] = {label: [] for label, _ in cases}
    for r in range(batches + 1):
        print(f"  round {r + 1}/{batches + 1}", file=sys.stderr, flush=True)
        for label, fn in cases:
            n = calls[label]
            start = time.perf_counter()
            for _ in range(n):
                await fn()
            if r:  # the first round warms up
                samples[label].append((time.perf_counter() - start) / n)
    return {label: statistics.median(v) for label, v in samples.items()}


async def warm_near_cache(cache: Cache, hit: Case, timeout: float = 10.0) -> None:
    """Await ``hit`` until the near cache serves it from memory (the push channel comes
    up on a background thread after the first lookup; until then hits take the round
    trip)."""
    channel = cache.backend.channel  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await hit()
        before = cache.stats().near_hits
        if channel.current():
            for _ in range(5):
                await hit()
            if cache.stats().near_hits - before >= 5:
                return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"the near cache never served a hit: {channel.reason or 'no reason'}")


def memoized_lookup(cache: Cache, Session: Any) -> Any:
    """The seed's lookup as an ``async def``, memoized (the session factory is closed
    over, not an argument: arguments are part of the key)."""

    @cache.memoize(ttl=600)
    async def get_user(h: str) -> BenchUser | None:
        async with Session() as s:
            stmt = select(BenchUser).where(BenchUser.api_key_hash == h)
            return (await s.scalars(stmt)).one_or_none()

    return get_user


async def run(args: argparse.Namespace) -> int:
    ns = f"bench-aio-{uuid.uuid4().hex[:8]}"
    prepare(POSTGRES_URL, args.users)  # the same table and rows as bench_hits
    engine = create_async_engine(POSTGRES_URL.replace("+psycopg:", "+psycopg_async:"))
    target = key_hash("k42")
    stmt_plain = select(BenchUser).where(BenchUser.api_key_hash == target)
    cases: list[tuple[str, Case]] = []

    plain = async_sessionmaker(engine, expire_on_commit=False)
    plain_session = plain()

    async def uncached() -> object:
        return (await plain_session.scalars(stmt_plain)).one()

    cases.append(("uncached ORM query (postgresql, AsyncSession)", uncached))

    caches = {
        ROUND_TRIP: Cache(REDIS_URL, namespace=ns, default_ttl=600, near_cache=False),
        NEAR: Cache(REDIS_URL, namespace=f"{ns}-near", default_ttl=600, near_cache=True),
        "memory": Cache(namespace=ns, default_ttl=600),
    }
    payload = b""
    for backend, cache in caches.items():
        Session = async_sessionmaker(engine, expire_on_commit=False)
        cache.attach(Session)

        get_user = memoized_lookup(cache, Session)
        await get_user(target)
        live = Session()
        stmt = stmt_plain.options(FromCache(ttl=600, cache=cache))
        await live.scalars(stmt)

        async def fromcache(s: Any = live, st: Any = stmt) -> object:
            return (await s.scalars(st)).one()

        backend_cases: list[tuple[str, Case]] = [
            (f"ormcache async memoize hit ({backend})", lambda f=get_user: f(target)),
            (f"ormcache FromCache hit ({backend}, AsyncSession)", fromcache),
        ]
        for label, fn in backend_cases:
            if backend == NEAR:
                await warm_near_cache(cache, fn)
            cases.append((label, fn))
        if backend == ROUND_TRIP:
            payload = cache._core.codec.encode(await get_user(target))

    client = aioredis.Redis.from_url(REDIS_URL)
    await client.set(f"{ns}:floor", payload)

    async def floor() -> object:
        data = await client.get(f"{ns}:floor")
        return msgpack.unpackb(
            data[4:], raw=False, strict_map_key=False, ext_hook=lambda code, d: d
        )

    cases.append(("raw redis.asyncio GET + msgpack unpack (floor)", floor))
    near_before = caches[NEAR].stats()
    results = await measure(cases, args.batches, args.batch_ms)
    near_after = caches[NEAR].stats()
    near_hits = near_after.near_hits - near_before.near_hits
    hits = near_after.hits - near_before.hits

    floor_s = results["raw redis.asyncio GET + msgpack unpack (floor)"]
    db_s = results["uncached ORM query (postgresql, AsyncSession)"]
    lines = [
        "| case | median µs/call | x floor | x uncached query |",
        "|---|---:|---:|---:|",
    ]
    for label, secs in sorted(results.items(), key=lambda kv: kv[1]):
        lines.append(f"| {label} | {secs * 1e6:.1f} | {secs / floor_s:.2f} | {secs / db_s:.2f} |")
    r = results
    fc_near = r[f"ormcache FromCache hit ({NEAR}, AsyncSession)"]
    memo_near = r[f"ormcache async memoize hit ({NEAR})"]
    notes = [
        goal(
            "- uncached AsyncSession query / FromCache near hit", db_s / fc_near, 4, at_most=False
        ),
        "- FromCache near hit / FromCache hit (memory): "
        f"{fc_near / r['ormcache FromCache hit (memory, AsyncSession)']:.2f}x",
        "- async memoize near hit / async memoize hit (memory): "
        f"{memo_near / r['ormcache async memoize hit (memory)']:.2f}x",
        "- async memoize hit (redis round trip) / floor: "
        f"{r[f'ormcache async memoize hit ({ROUND_TRIP})'] / floor_s:.2f}x",
        "- uncached AsyncSession query / FromCache hit (redis round trip): "
        f"{db_s / r[f'ormcache FromCache hit ({ROUND_TRIP}, AsyncSession)']:.2f}x",
        f"- near cache, while measured: {near_hits:,} of {hits:,} hits served from memory "
        f"({near_hits / max(hits, 1):.2%}); the rest took the round trip",
    ]
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "async.md").write_text(text)
    print(f"wrote {RESULTS / 'async.md'}")

    await plain_session.close()
    await client.delete(f"{ns}:floor")
    await client.aclose()
    for cache in caches.values():
        cache.clear()
        cache.close()
    await engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ormcache asyncio hit benchmarks")
    parser.add_argument("--batches", type=int, default=21)
    parser.add_argument("--batch-ms", type=float, default=40.0)
    parser.add_argument("--users", type=int, default=1000)
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
