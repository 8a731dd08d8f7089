"""Signatures that mean something (issue 12): with ``secret=``, an entry planted by
someone who can write to Redis but does not know the secret is never served.

Before, the MAC covered the payload body only. A signed entry moved to another key, one
replayed with an empty tag header and no TTL, one with a rewritten expiry, or one written
by another codec version all verified, and were served. Now the MAC binds the key, the
tags and generations the backend checked, the entry's expiry and the codec version (see
``ormcache.signing``); such entries are corrupt: counted, deleted, a miss. Every server
here is a private redis-server process of this module's own.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import sessionmaker

from ormcache import Cache
from tests.models import Base, User, key_hash, seed
from tests.redis_procs import PrivateRedis

_META = struct.Struct(">cdd")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    proc = PrivateRedis(str(tmp_path_factory.mktemp("signing")))
    proc.start()
    yield proc
    proc.kill()


class Rig:
    """A signed cache on the private server, a seeded SQLite database, and a raw client
    playing the attacker (who can write to Redis but does not know the secret)."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.ns = f"sig-{uuid.uuid4().hex[:10]}"
        self.engine = create_engine(f"sqlite:///{tmp}/signing.sqlite")
        Base.metadata.create_all(self.engine)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        seed(self.Session)
        self.cache = Cache(url, namespace=self.ns, secret="s3cret-for-tests")
        self.cache.attach(self.Session)
        self.redis = redis.Redis.from_url(url)
        self.calls = 0

    def lookup(self, **options: Any) -> Any:
        Session = self.Session

        @self.cache.memoize(**options)
        def name_of(api_key: str) -> str | None:
            self.calls += 1
            with Session() as s:
                return s.scalar(select(User.name).where(User.api_key_hash == key_hash(api_key)))

        return name_of

    def entry(self, fn: Any, api_key: str) -> str:
        return f"{self.ns}:e:{fn.cache_key(api_key)}"

    def rename(self, user_id: int, name: str) -> None:
        with self.Session() as s:
            s.execute(update(User).where(User.id == user_id).values(name=name))
            s.commit()

    def corrupt(self) -> int:
        return self.cache.stats().corrupt

    def close(self) -> None:
        self.cache.clear()
        self.cache.detach(self.Session)
        self.redis.close()
        self.engine.dispose()


@pytest.fixture
def rig(server: PrivateRedis, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(server.url, tmp_path)
    yield r
    r.close()


def split(value: bytes) -> tuple[bytes, bytes]:
    """A stored Redis entry as (its framing with the tag/generation header, the payload
    the read path gets), by the documented layout (``backends/redis/core.py``)."""
    assert value[:4] == b"OCE1"
    end = 6 + int.from_bytes(value[4:6], "big")
    return value[:end], value[end:]


def reframe(value: bytes) -> bytes:
    """The stored entry with an empty tag/generation header: nothing left to check."""
    return b"OCE1\x00\x00" + split(value)[1]


def test_a_signed_entry_moved_to_another_key_is_a_miss(rig: Rig) -> None:
    """Issue 12: user 1's signed entry, copied onto user 2's key, was served for user 2.
    The MAC covers the key name now, so the copy is corrupt: counted, deleted, a miss."""
    name_of = rig.lookup(ttl=60)
    assert name_of("key-0-secret") == "user0"
    assert name_of("key-1-secret") == "user1"
    stolen = rig.redis.get(rig.entry(name_of, "key-0-secret"))
    assert stolen is not None
    rig.redis.set(rig.entry(name_of, "key-1-secret"), stolen)
    assert name_of("key-1-secret") == "user1"
    assert rig.corrupt() == 1
    assert name_of("key-1-secret") == "user1"  # stored anew, and served
    # The same holds with the header rewritten to match the target (no tags to check).
    rig.redis.set(rig.entry(name_of, "key-1-secret"), reframe(stolen))
    assert name_of("key-1-secret") == "user1"
    assert rig.corrupt() == 2


def test_an_old_entry_replayed_without_tags_or_ttl_is_a_miss_even_after_invalidate(
    rig: Rig,
) -> None:
    """Issue 12: an old entry replayed with an empty tag header and no TTL was served
    forever, even after ``invalidate()``. The MAC covers the generations the backend
    checked, so a stripped header no longer verifies."""
    name_of = rig.lookup(ttl=60)
    assert name_of("key-0-secret") == "user0"
    captured = rig.redis.get(rig.entry(name_of, "key-0-secret"))
    assert captured is not None
    rig.rename(1, "renamed")
    assert name_of("key-0-secret") == "renamed"

    rig.redis.set(rig.entry(name_of, "key-0-secret"), reframe(captured))  # no TTL
    assert name_of("key-0-secret") == "renamed"
    assert rig.corrupt() == 1

    rig.redis.set(rig.entry(name_of, "key-0-secret"), reframe(captured))
    assert rig.cache.invalidate(User)
    name_of.invalidate("key-0-secret")
    rig.redis.set(rig.entry(name_of, "key-0-secret"), reframe(captured))
    assert name_of("key-0-secret") == "renamed"
    assert name_of("key-0-secret") == "renamed"
    # The genuine old entry, header intact, fails the backend's generation check.
    rig.redis.set(rig.entry(name_of, "key-0-secret"), captured)
    assert name_of("key-0-secret") == "renamed"


def test_a_tampered_or_removed_expiry_is_a_miss(rig: Rig) -> None:
    """The expiry is signed and enforced by the read path: an entry past its TTL,
    replayed with no Redis TTL (or a far-future ``fresh_until``), is never served."""
    name_of = rig.lookup(ttl=0.3)
    assert name_of("key-0-secret") == "user0"
    key = rig.entry(name_of, "key-0-secret")
    captured = rig.redis.get(key)
    assert captured is not None
    time.sleep(0.5)
    assert rig.redis.get(key) is None  # Redis expired it

    framing, payload = split(captured)
    _, _, took = _META.unpack_from(payload)
    forever = _META.pack(payload[:1], float("inf"), took) + payload[_META.size :]
    rig.redis.set(key, framing + forever)
    calls = rig.calls
    assert name_of("key-0-secret") == "user0"
    assert rig.calls == calls + 1, "a replayed entry with a forged expiry was served"
    assert rig.corrupt() == 1

    # Untouched but persisted past its expiry: stale, never served (no stale window).
    rig.redis.set(key, captured)
    assert name_of("key-0-secret") == "user0"
    assert rig.calls == calls + 2


def test_a_persisted_entry_never_outlives_its_stale_window(rig: Rig) -> None:
    """``stale_ttl`` serves an expired entry while it refreshes, but only within the
    window: an entry whose Redis TTL was removed is not served stale forever."""
    name_of = rig.lookup(ttl=0.2, stale_ttl=0.3)
    assert name_of("key-0-secret") == "user0"
    key = rig.entry(name_of, "key-0-secret")
    captured = rig.redis.get(key)
    assert captured is not None
    time.sleep(0.7)
    rig.redis.set(key, captured)  # persisted: no TTL at all
    stale_hits = rig.cache.stats().stale_hits
    calls = rig.calls
    assert name_of("key-0-secret") == "user0"
    assert rig.cache.stats().stale_hits == stale_hits, "served past its stale window"
    assert rig.calls == calls + 1


def test_an_entry_of_another_codec_version_is_a_miss(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry signed (with the same secret) by a writer of another codec version, its
    version byte rewritten to ours, must not decode under our format: the MAC covers the
    codec version."""
    from ormcache.codec import wire

    name_of = rig.lookup(ttl=60)
    monkeypatch.setattr(wire, "VERSION", wire.VERSION + 1)
    monkeypatch.setattr("ormcache.signing.VERSION", wire.VERSION, raising=False)
    assert name_of("key-0-secret") == "user0"  # stored by the "other version"
    monkeypatch.undo()
    key = rig.entry(name_of, "key-0-secret")
    value = rig.redis.get(key)
    assert value is not None
    other = bytes((wire.VERSION + 1,))
    for offset in (_META.size, _META.size + 32):  # the payload, after any MAC
        at = len(split(value)[0]) + offset
        if value[at : at + 3] == b"OC" + other:
            value = value[: at + 2] + bytes((wire.VERSION,)) + value[at + 3 :]
            break
    else:
        pytest.fail("no payload of the other version found in the entry")
    rig.redis.set(key, value)
    calls = rig.calls
    assert name_of("key-0-secret") == "user0"
    assert rig.calls == calls + 1, "an entry of another codec version was served"
    assert rig.corrupt() == 1
