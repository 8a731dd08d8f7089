"""The main job for now: memoize an API-key lookup on SQLite plus the in-memory cache.

Run it with ``./scripts/run``. It seeds users (with progress), then shows a miss, a hit
that runs no SQL, and a revocation that takes effect on the very next lookup.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import secrets
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import DateTime, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from ormcache import Cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000, help="users to seed")
    parser.add_argument("--db", default=None, help="SQLite file (default: a temp file)")
    args = parser.parse_args(argv)

    db = Path(args.db) if args.db else Path(tempfile.mkdtemp()) / "demo.sqlite"
    engine = create_engine(f"sqlite:///{db}")
    Base.metadata.create_all(engine)
    Session = sessionmaker(engine, expire_on_commit=False)
    statements = {"n": 0}
    event.listen(
        engine,
        "before_cursor_execute",
        lambda *a: statements.__setitem__("n", statements["n"] + 1),
    )

    cache = Cache()  # the embedded default: in-process memory
    cache.attach(Session)

    print(f"seeding {args.users} users into {db}", flush=True)
    keys: list[str] = []
    with Session() as s:
        batch = max(1, args.users // 10)
        for i in range(args.users):
            key = secrets.token_urlsafe(24)
            keys.append(key)
            s.add(
                User(
                    name=f"user{i}",
                    api_key_hash=hash_key(key),
                    created_at=dt.datetime.now(dt.timezone.utc),
                )
            )
            if (i + 1) % batch == 0 or i + 1 == args.users:
                s.flush()
                print(f"  {i + 1}/{args.users} users", flush=True)
        s.commit()

    @cache.memoize(ttl=300)
    def authenticate(api_key: str) -> User | None:
        with Session() as s:
            return s.scalars(
                select(User).where(User.api_key_hash == hash_key(api_key), User.active)
            ).one_or_none()

    def timed(label: str, key: str) -> User | None:
        statements["n"] = 0
        start = time.perf_counter()
        user = authenticate(key)
        took = (time.perf_counter() - start) * 1e6
        who = user.name if user else "401 unknown or revoked key"
        print(f"{label:<34} {who:<28} {took:8.1f} µs  {statements['n']} SQL")
        return user

    key = keys[len(keys) // 2]
    timed("first lookup (miss)", key)
    timed("second lookup (hit)", key)
    timed("third lookup (hit)", key)

    with Session() as s:
        user = s.scalars(select(User).where(User.api_key_hash == hash_key(key))).one()
        user.active = False
        s.commit()
    print("revoked the key (commit invalidates the cached lookup)")
    timed("lookup after revocation", key)
    timed("again (negative result cached)", key)

    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        authenticate(keys[0])
    per_hit = (time.perf_counter() - start) / n * 1e6
    print(f"{n} hits: {per_hit:.1f} µs per hit (in-process memory backend)")
    print("stats:", cache.stats().as_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
