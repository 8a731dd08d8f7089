"""What a commit costs with ormcache attached, as the number of cached entries grows.

Invalidation bumps generation counters; it never scans entries. So the added cost of a
commit (round trips and µs) must stay flat from 1e3 to 1e5 cached entries.

Run: ``.venv/bin/python -m benchmarks.bench_commit`` (PostgreSQL + Redis).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from typing import Any

from sqlalchemy import String, create_engine, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from benchmarks.common import POSTGRES_URL, REDIS_URL, RESULTS
from ormcache import Cache
from ormcache.backends.redis import RedisBackend


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class CountingBackend:
    """Wraps a backend and counts calls: each call is one round trip on Redis."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return attr(*args, **kwargs)

        return counted


def commit_cost(factory: Any, n: int, rounds: int) -> float:
    samples = []
    for i in range(rounds):
        with factory() as s:
            s.execute(update(Item).where(Item.id == 1 + (i % 50)).values(name=f"n{i}"))
            start = time.perf_counter()
            s.commit()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]

    engine = create_engine(POSTGRES_URL)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    plain = sessionmaker(engine)
    with plain() as s:
        s.add_all(Item(id=i, name=f"item{i}") for i in range(1, max(sizes) + 1))
        s.commit()
    baseline = commit_cost(plain, 0, args.rounds)

    lines = [
        "| cached entries | commit median µs (no cache) | with ormcache | added µs | round trips |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        ns = f"bench-commit-{uuid.uuid4().hex[:8]}"
        counting = CountingBackend(RedisBackend.from_url(REDIS_URL, ns))
        cache = Cache(REDIS_URL, namespace=ns, default_ttl=3600, backend=counting)  # type: ignore[arg-type]
        factory = sessionmaker(engine)
        cache.attach(factory)

        @cache.memoize(ttl=3600, ignore=("factory",))
        def name_of(item_id: int, factory: Any = factory) -> str:
            with factory() as s:
                return s.scalars(select(Item.name).where(Item.id == item_id)).one()

        print(f"  caching {n} entries ...", file=sys.stderr, flush=True)
        for i in range(1, 201):  # real memoized entries on the rows being written
            name_of(i)
        # The rest: entries of the same size and layout, written in bulk.
        entry = counting.inner.client.get(f"{ns}:e:{name_of.cache_key(1)}")
        pipe = counting.inner.client.pipeline(transaction=False)
        for i in range(n - 200):
            pipe.set(f"{ns}:e:filler:{i}", entry, ex=3600)
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
        counting.calls = 0
        with_cache = commit_cost(factory, n, args.rounds)
        trips = counting.calls / args.rounds
        lines.append(
            f"| {n:,} | {baseline * 1e6:.0f} | {with_cache * 1e6:.0f} | "
            f"{(with_cache - baseline) * 1e6:.0f} | {trips:.1f} |"
        )
        cache.clear()
        cache.close()
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "commit.md").write_text(text)
    Base.metadata.drop_all(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
