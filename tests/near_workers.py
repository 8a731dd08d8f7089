"""A writer process for the near-cache tests (spawned: its own cache, its own channel).

It waits for a command on a pipe, carries it out through its own ``Cache`` (a commit
through an attached session, ``cache.invalidate(User)``, or ``name_of.invalidate(key)``)
and answers only after that call has returned: from then on, every read that starts in
another process must see it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import Cache
from tests.fault_workers import lookup_fn
from tests.models import User, key_hash


def lookups(cache: Cache, Session: Any) -> Any:
    """The memoized lookup both sides share (one ``name=``: one key in every process)."""
    return lookup_fn(cache, Session, name="near-tests.name_of")


def writer(db_url: str, redis_url: str, namespace: str, conn: Any) -> None:
    engine = create_engine(db_url)
    Session = sessionmaker(engine, expire_on_commit=False)
    cache = Cache(redis_url, namespace=namespace, near_cache=False)
    cache.attach(Session)
    name_of = lookups(cache, Session)
    # Not attached: what it writes, the cache cannot see (so only the call invalidates).
    behind = create_engine(db_url)
    conn.send("ready")
    while True:
        command = conn.recv()
        if command is None:
            break
        action, api_key, value = command
        if action == "commit":
            with Session() as s:
                user = s.scalars(select(User).where(User.api_key_hash == key_hash(api_key))).one()
                user.name = value
                s.commit()
        else:
            # Written behind the cache's back, then invalidated by hand.
            with behind.begin() as c:
                c.execute(
                    User.__table__.update()
                    .where(User.api_key_hash == key_hash(api_key))
                    .values(name=value)
                )
            if action == "invalidate-table":
                assert cache.invalidate(User, raise_on_error=True)
            elif action == "invalidate-key":
                assert name_of.invalidate(api_key)
            else:  # pragma: no cover - a typo in a test
                raise ValueError(action)
        conn.send("done")
    cache.close()
    engine.dispose()
    behind.dispose()
