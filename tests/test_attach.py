"""``attach()`` and ``detach()``: listeners are added once, removed completely, and every
attached cache hears every commit (README "Quick start")."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from ormcache import Cache, FromCache
from tests.conftest import SQLCounter
from tests.models import User, key_hash, seed

SESSION_EVENTS = (
    "after_flush",
    "after_begin",
    "do_orm_execute",
    "before_commit",
    "after_commit",
    "after_soft_rollback",
    "after_transaction_end",
)


def _count_listeners(target: Any) -> int:
    """Session listeners that a session made by ``target`` runs."""
    if isinstance(target, scoped_session):
        target = target.session_factory
    with target() as session:
        return sum(len(getattr(session.dispatch, name)) for name in SESSION_EVENTS)


def _name_by_key(cache: Cache, Session: Any) -> Any:
    @cache.memoize(ttl=60)
    def name_of(api_key: str) -> str | None:
        with Session() as s:
            user = s.scalars(
                select(User).where(User.api_key_hash == key_hash(api_key))
            ).one_or_none()
            return None if user is None else user.name

    return name_of


def _rename(Session: Any, user_id: int, name: str) -> None:
    with Session() as s:
        s.execute(update(User).where(User.id == user_id).values(name=name))
        s.commit()


@pytest.mark.parametrize("kind", ["sessionmaker", "scoped_session", "session_class", "engine"])
def test_attach_twice_is_a_no_op(cache: Cache, sqlite_engine: Any, kind: str) -> None:
    """An application factory that runs many times (tests, reloaders) must not stack
    listeners: the second attach of the same target adds nothing, and a commit still
    invalidates once."""
    factory = sessionmaker(sqlite_engine)
    target: Any = {
        "sessionmaker": factory,
        "scoped_session": scoped_session(factory),
        "session_class": type("AppSession", (Session,), {}),
        "engine": sqlite_engine,
    }[kind]
    cache.attach(target)
    before = _count_listeners(target) if kind != "engine" else len(sqlite_engine.dispatch.commit)
    for _ in range(5):
        cache.attach(target)
    after = _count_listeners(target) if kind != "engine" else len(sqlite_engine.dispatch.commit)
    assert after == before > 0


def test_detach_removes_every_listener(cache: Cache, sqlite_engine: Any) -> None:
    """After detach, the target has exactly the listeners it had before attach, and the
    cache no longer serves or tracks it."""
    factory = sessionmaker(sqlite_engine)
    seed(factory)
    baseline = _count_listeners(factory)
    engine_baseline = {
        n: len(getattr(sqlite_engine.dispatch, n))
        for n in ("before_execute", "commit", "rollback", "begin")
    }
    cache.attach(factory)
    cache.attach(sqlite_engine)
    assert _count_listeners(factory) > baseline
    cache.detach(factory)
    cache.detach(sqlite_engine)
    assert _count_listeners(factory) == baseline
    for name, n in engine_baseline.items():
        assert len(getattr(sqlite_engine.dispatch, name)) == n, name
    assert len(sqlite_engine.pool.dispatch.checkin) == 0

    # FromCache through a detached sessionmaker runs SQL every time.
    counter = SQLCounter(sqlite_engine)
    stmt = select(User).where(User.id == 1).options(FromCache(ttl=60))
    for _ in range(2):
        with factory() as s:
            assert s.scalars(stmt).one().name == "user0"
    assert counter.count == 2
    assert cache.stats().hits == 0


def test_detach_of_an_unattached_target_is_ignored(cache: Cache, sqlite_engine: Any) -> None:
    cache.detach(sessionmaker(sqlite_engine))
    cache.detach(sqlite_engine)


def test_reattach_after_detach_tracks_again(cache: Cache, sqlite_engine: Any) -> None:
    factory = sessionmaker(sqlite_engine)
    seed(factory)
    cache.attach(factory)
    cache.detach(factory)
    cache.attach(factory)
    name_of = _name_by_key(cache, factory)
    assert name_of("key-0-secret") == "user0"
    _rename(factory, 1, "renamed")
    assert name_of("key-0-secret") == "renamed"


def test_two_caches_on_one_sessionmaker_are_both_invalidated(
    cache_url: str, namespace: str, sqlite_engine: Any
) -> None:
    """Each cache keeps its own transaction record, so a commit bumps both."""
    factory = sessionmaker(sqlite_engine)
    seed(factory)
    first = Cache(cache_url, namespace=namespace + "-a", strict=True)
    second = Cache(cache_url, namespace=namespace + "-b", strict=True)
    try:
        first.attach(factory)
        second.attach(factory)
        a = _name_by_key(first, factory)
        b = _name_by_key(second, factory)
        assert a("key-1-secret") == b("key-1-secret") == "user1"
        assert a("key-1-secret") == b("key-1-secret") == "user1"
        assert first.stats().hits == second.stats().hits == 1
        _rename(factory, 2, "renamed")
        assert a("key-1-secret") == "renamed"
        assert b("key-1-secret") == "renamed"
    finally:
        for c in (first, second):
            c.clear()
            c.close()


def test_close_removes_every_listener(cache_url: str, namespace: str, sqlite_engine: Any) -> None:
    """A closed cache no longer watches the engines it reached: commits elsewhere must
    not keep paying for its leases."""
    factory = sessionmaker(sqlite_engine)
    baseline = _count_listeners(factory)
    before = len(sqlite_engine.dispatch.before_cursor_execute)
    closing = Cache(cache_url, namespace=namespace)
    closing.attach(factory)
    seed(factory)  # a transaction: the engine is watched from here
    assert len(sqlite_engine.dispatch.before_cursor_execute) > before
    closing.close()
    assert _count_listeners(factory) == baseline
    assert len(sqlite_engine.dispatch.before_cursor_execute) == before
