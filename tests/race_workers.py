"""Processes for the read-after-commit race test (spawned, so each builds its own state).

Writers bump a counter row and publish the committed version *after* ``commit()``
returns. Readers note the published version *before* they start a read; a read that
returns less than that is a stale read, the thing ormcache promises never happens.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Integer, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from ormcache import Cache, FromCache


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "oc_race_counter"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


def _setup(
    db_url: str, redis_url: str, namespace: str, near_cache: bool | None = None
) -> tuple[Cache, Any]:
    engine = create_engine(db_url, pool_size=2)
    Session = sessionmaker(engine, expire_on_commit=False)
    cache = Cache(
        redis_url, namespace=namespace, strict=True, default_ttl=60, near_cache=near_cache
    )
    cache.attach(Session)
    return cache, Session


def writer(
    db_url: str,
    redis_url: str,
    namespace: str,
    published: Any,
    stop: Any,
    n_rows: int,
    seed: int,
    pause: float = 0.002,
    near_cache: bool | None = None,
) -> None:
    cache, Session = _setup(db_url, redis_url, namespace, near_cache)
    # A slow COMMIT (as with fsync latency) widens the window between the write lease and
    # the data becoming visible: exactly where a broken protocol would store stale data.
    event.listen(Session.kw["bind"], "commit", lambda conn: time.sleep(0.003))
    i = seed
    while not stop.is_set():
        row = 1 + (i % n_rows)
        i += 1
        with Session() as s:
            counter = s.scalars(select(Counter).where(Counter.id == row).with_for_update()).one()
            counter.version += 1
            committed = counter.version
            s.commit()
        # commit() has returned: from now on every read must see >= committed.
        with published[row - 1].get_lock():
            if published[row - 1].value < committed:
                published[row - 1].value = committed
        time.sleep(pause)
    cache.close()


def reader(
    db_url: str,
    redis_url: str,
    namespace: str,
    mode: str,
    published: Any,
    stop: Any,
    n_rows: int,
    seed: int,
    results: Any,
    progress: Any,
    pause: float = 0.0,
    near_cache: bool | None = None,
) -> None:
    cache, Session = _setup(db_url, redis_url, namespace, near_cache)

    @cache.memoize(ttl=60)
    def memoized_version(row: int) -> int:
        with Session() as s:
            return s.scalars(select(Counter.version).where(Counter.id == row)).one()

    def fromcache_version(row: int) -> int:
        with Session() as s:
            return (
                s.scalars(select(Counter).where(Counter.id == row).options(FromCache(ttl=60)))
                .one()
                .version
            )

    def transaction_then_fresh(row: int) -> int:
        """A plain read fixes the transaction's snapshot (REPEATABLE READ), then cached
        reads run in the same transaction while writers commit: none of them may store
        that snapshot as current. The read checked is a fresh one, afterwards."""
        with Session() as s:
            s.get(Counter, 1 + (row % n_rows))
            for _ in range(2):
                s.scalars(select(Counter).where(Counter.id == row).options(FromCache(ttl=60))).one()
                memoized_in(s, row)
        return 0

    @cache.memoize(ttl=60)
    def memoized_in(session: Any, row: int) -> int:
        return session.scalars(select(Counter.version).where(Counter.id == row)).one()

    read = {
        "memoize": memoized_version,
        "fromcache": fromcache_version,
        "transaction": transaction_then_fresh,
    }[mode]
    reads = stale = 0
    worst = 0
    # How each stale read was served (a diagnosis when the assertion fails): from the
    # near cache's memory, by a Redis hit, or by the database (a miss).
    served_by: dict[str, int] = {}
    i = seed
    while not stop.is_set():
        seen = cache.stats()
        row = 1 + (i % n_rows)
        i += 1
        if mode == "transaction":
            # The transaction's own reads come first; the floor is noted before the
            # fresh read that is checked.
            read(row)
            floor = published[row - 1].value
            got = fromcache_version(row)
        else:
            floor = published[row - 1].value
            got = read(row)
        # A transaction round makes four cached reads of its own before the checked one.
        done = 5 if mode == "transaction" else 1
        before = reads
        reads += done
        if reads // 100 > before // 100:
            with progress.get_lock():
                progress.value += (reads // 100 - before // 100) * 100
        if got < floor:
            stale += 1
            worst = max(worst, floor - got)
            now = cache.stats()
            how = (
                "near"
                if now.near_hits > seen.near_hits
                else "redis"
                if now.hits > seen.hits
                else "database"
            )
            served_by[how] = served_by.get(how, 0) + 1
        if pause:
            time.sleep(pause)  # see race_across_processes: writers must progress too
    stats = cache.stats()
    results.put(
        (reads, stale, worst, stats.hits, stats.store_conflicts, stats.near_hits, served_by)
    )
    cache.close()
