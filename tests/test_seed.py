"""The seed outage, pinned: memoizing an API-key lookup that returns ``user.__dict__``.

flask-caching pickled ``_sa_instance_state`` whose object was already garbage-collected;
the API answered 5xx. ormcache refuses that value with an error that names the fix, and the
fixed patterns (the object, a list, a Row, ``as_dict``) cache with hit == miss and no SQL.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from ormcache import Cache, UncacheableValueError, as_dict
from tests.models import User, key_hash, seed
from tests.support.sql import SQLCounter

COLUMNS = ("id", "name", "email", "api_key_hash", "active", "balance", "created_at")


def fresh_row(Session: Any, api_key: str) -> dict[str, Any]:
    with Session() as s:
        user = s.scalars(select(User).where(User.api_key_hash == key_hash(api_key))).one()
        return {c: getattr(user, c) for c in COLUMNS}


def test_seed_pattern_raises_a_clear_error_in_strict_mode(cache: Cache, sqlite_engine: Any) -> None:
    """The exact seed: ``return user.__dict__`` with the user collected before storing."""
    Session = sessionmaker(sqlite_engine)
    cache.attach(Session)
    keys = seed(Session)

    @cache.memoize(ttl=60)
    def get_user(api_key: str) -> dict[str, Any] | None:
        with Session() as s:
            user = s.scalars(
                select(User).where(User.api_key_hash == key_hash(api_key))
            ).one_or_none()
            return user.__dict__ if user else None

    with pytest.raises(UncacheableValueError) as info:
        get_user(keys[0])
    gc.collect()
    message = str(info.value)
    assert "_sa_instance_state" in message
    assert "ormcache.as_dict" in message
    assert "return the object" in message
    assert info.value.path == "value['_sa_instance_state']"
    assert keys[0] not in message
    assert cache.stats().stores == 0


def test_seed_pattern_is_served_uncached_outside_strict_mode(
    cache_url: str, namespace: str, sqlite_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Non-strict: the call still answers (no 5xx), uncached, and the problem is logged once."""
    cache = Cache(cache_url, namespace=namespace, strict=False)
    Session = sessionmaker(sqlite_engine)
    cache.attach(Session)
    keys = seed(Session)

    @cache.memoize(ttl=60)
    def get_user(api_key: str) -> dict[str, Any] | None:
        with Session() as s:
            user = s.scalars(
                select(User).where(User.api_key_hash == key_hash(api_key))
            ).one_or_none()
            return user.__dict__ if user else None

    with caplog.at_level(logging.WARNING, logger="ormcache"):
        for _ in range(3):
            value = get_user(keys[0])
            assert value is not None
            assert value["name"] == "user0"
    warnings = [r for r in caplog.records if "cannot be cached" in r.getMessage()]
    assert len(warnings) == 1
    assert keys[0] not in caplog.text
    stats = cache.stats()
    assert stats.hits == 0
    assert stats.stores == 0
    assert stats.uncacheable == 3
    cache.clear()
    cache.close()


@pytest.mark.parametrize("shape", ["object", "list", "row", "as_dict"])
def test_fixed_patterns_hit_equals_miss_with_zero_sql(
    cache: Cache, sqlite_engine: Any, shape: str
) -> None:
    """Returning the object, a list of objects, a Row or ``as_dict(obj)`` caches correctly:
    the hit equals a fresh database read and runs no SQL."""
    Session = sessionmaker(sqlite_engine)
    cache.attach(Session)
    keys = seed(Session)
    counter = SQLCounter(sqlite_engine)

    @cache.memoize(ttl=60)
    def lookup(api_key: str) -> Any:
        with Session() as s:
            stmt = select(User).where(User.api_key_hash == key_hash(api_key))
            if shape == "object":
                return s.scalars(stmt).one()
            if shape == "list":
                return s.scalars(select(User).order_by(User.id)).all()
            if shape == "row":
                return s.execute(
                    select(User.id, User.name, User.email, User.balance, User.created_at).where(
                        User.api_key_hash == key_hash(api_key)
                    )
                ).one()
            return as_dict(s.scalars(stmt).one())

    miss = lookup(keys[1])
    assert counter.count > 0
    counter.reset()
    hit = lookup(keys[1])
    assert counter.count == 0, counter.statements
    assert cache.stats().hits == 1

    expected = fresh_row(Session, keys[1])
    if shape == "object":
        assert type(hit) is User
        assert {c: getattr(hit, c) for c in COLUMNS} == expected
        assert {c: getattr(miss, c) for c in COLUMNS} == expected
    elif shape == "list":
        assert [type(u) for u in hit] == [User] * 3
        assert [u.id for u in hit] == [1, 2, 3]
        assert {c: getattr(hit[1], c) for c in COLUMNS} == expected
    elif shape == "row":
        assert tuple(hit) == tuple(miss)
        assert hit._fields == miss._fields
        assert hit.name == expected["name"]
        assert hit.created_at == expected["created_at"]
        assert type(hit.balance) is type(expected["balance"])
    else:
        assert "_sa_instance_state" not in hit
        assert hit == miss
        assert {c: hit[c] for c in COLUMNS} == expected


class _PlantFile:
    """Unpickling this would create a file: the canary for code execution."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_planted_pickle_payload_is_a_miss_and_never_runs(
    redis_url: str, namespace: str, sqlite_engine: Any, tmp_path: Any
) -> None:
    """Whoever can write to Redis cannot run code: a pickle under a memoized key is a miss,
    deleted, counted, and recomputed; the file it would create never appears."""
    import redis

    cache = Cache(redis_url, namespace=namespace, strict=True)
    Session = sessionmaker(sqlite_engine)
    cache.attach(Session)
    keys = seed(Session)

    @cache.memoize(ttl=60)
    def get_user(api_key: str) -> User | None:
        with Session() as s:
            return s.scalars(
                select(User).where(User.api_key_hash == key_hash(api_key))
            ).one_or_none()

    canary = str(tmp_path / "pwned")
    evil = pickle.dumps(_PlantFile(canary))
    key = get_user.cache_key(keys[0])
    # 1. A well-formed entry (valid generations) whose payload is a pickle.
    snap = cache.backend.snapshot(["*"])
    assert snap is not None
    assert cache.backend.set(key, evil, 60, snap)
    user = get_user(keys[0])
    assert user is not None
    assert user.name == "user0"
    assert cache.stats().corrupt == 1
    assert not os.path.exists(canary)
    # 2. Raw bytes written straight over the entry key, bypassing the entry format.
    client = redis.Redis.from_url(redis_url)
    raw_keys = [k for k in client.scan_iter(f"{namespace}:*") if b":e:" in k]
    assert raw_keys
    for raw in raw_keys:
        client.set(raw, evil)
    user = get_user(keys[0])
    assert user is not None
    assert user.email == "user0@example.com"
    assert not os.path.exists(canary)
    # After recomputation the entry is good again: the next call is a clean hit.
    before = cache.stats().hits
    assert get_user(keys[0]).name == "user0"  # type: ignore[union-attr]
    assert cache.stats().hits == before + 1
    client.close()
    cache.clear()
    cache.close()
