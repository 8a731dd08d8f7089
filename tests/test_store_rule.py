"""Store rule: only committed, current data is stored (README "Guarantees and their limits").

Every test ends with the database as the oracle: after the scenario, a cached read in a
fresh session must return exactly what an uncached read returns. Each scenario is
spelled several ways (plain reads, FromCache, memoize; isolation set on the server, the
engine or the connection; ORM, bulk, Core and driver SQL writes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from ormcache import Cache, FromCache
from tests.models import Base, User, seed


@pytest.fixture(params=["postgres", "mariadb"])
def server_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def world(cache: Cache, server_url: str) -> Iterator[dict[str, Any]]:
    """Tables fresh on the server, an attached sessionmaker, and an unattached oracle."""
    engine = create_engine(server_url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine, expire_on_commit=False)
    seed(factory)
    cache.attach(factory)
    oracle = create_engine(server_url)  # never attached: the truth
    yield {"cache": cache, "engine": engine, "Session": factory, "oracle": oracle}
    oracle.dispose()
    Base.metadata.drop_all(engine)
    engine.dispose()


def truth(world: dict[str, Any], user_id: int = 1) -> str:
    with world["oracle"].connect() as conn:
        return str(conn.execute(text(f"SELECT name FROM oc_users WHERE id = {user_id}")).scalar())


def cached_name(session: Session, user_id: int = 1) -> str:
    stmt = select(User.name).where(User.id == user_id).options(FromCache(ttl=60))
    return str(session.execute(stmt).scalar_one())


def assert_cache_agrees(world: dict[str, Any]) -> None:
    """A cached read (twice: the second may be a hit) in fresh sessions equals the truth,
    and so does a memoized lookup."""
    expected = truth(world)
    for _ in range(2):
        with world["Session"]() as s:
            assert cached_name(s) == expected
    cache: Cache = world["cache"]
    Session = world["Session"]

    @cache.memoize(ttl=60)
    def memo_name(user_id: int) -> str:
        with Session() as s:
            return str(s.scalars(select(User.name).where(User.id == user_id)).one())

    assert memo_name(1) == expected
    assert memo_name(1) == expected


def commit_rename(world: dict[str, Any], name: str) -> None:
    with world["Session"]() as s:
        s.execute(update(User).where(User.id == 1).values(name=name))
        s.commit()


RR = "REPEATABLE READ"


def _rr_session(world: dict[str, Any], how: str) -> Session:
    """A session whose transaction runs at REPEATABLE READ, set in one of the ways an
    application does it."""
    engine = world["engine"]
    if how == "connection":
        s = world["Session"]()
        s.connection(execution_options={"isolation_level": RR})
        return s
    if how == "engine":
        rr_engine = engine.execution_options(isolation_level=RR)
        return Session(bind=rr_engine, expire_on_commit=False)
    if how == "sessionmaker":
        return sessionmaker(engine.execution_options(isolation_level="SERIALIZABLE"))()
    raise AssertionError(how)


FIRST_READS: dict[str, Callable[[Session], object]] = {
    "get": lambda s: s.get(User, 2),
    "fromcache_miss": lambda s: s.execute(
        select(User).where(User.id == 3).options(FromCache(ttl=60))
    ).all(),
    "text": lambda s: s.execute(text("SELECT count(*) FROM oc_users")).scalar(),
    "core": lambda s: s.connection().execute(select(User.__table__.c.id)).all(),
}


@pytest.mark.parametrize("first", sorted(FIRST_READS))
@pytest.mark.parametrize("how", ["connection", "engine", "sessionmaker"])
def test_an_old_snapshot_is_never_stored(world: dict[str, Any], first: str, how: str) -> None:
    """REPEATABLE READ / SERIALIZABLE: a transaction's later reads see its first
    statement's snapshot; a commit in between must not make that old row current."""
    s = _rr_session(world, how)
    try:
        FIRST_READS[first](s)
        commit_rename(world, "after-snapshot")
        # What the database answers inside the transaction: the old name from the
        # snapshot (MariaDB's SERIALIZABLE reads lock instead, and see the new one).
        assert cached_name(s) in ("user0", "after-snapshot")
        s.rollback()
    finally:
        s.close()
    assert truth(world) == "after-snapshot"
    assert_cache_agrees(world)


def test_mariadb_default_isolation_is_detected(cache: Cache, mariadb_url: str) -> None:
    """MariaDB's default is REPEATABLE READ with no option set anywhere."""
    engine = create_engine(mariadb_url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine, expire_on_commit=False)
    seed(factory)
    cache.attach(factory)
    oracle = create_engine(mariadb_url)
    world = {"cache": cache, "engine": engine, "Session": factory, "oracle": oracle}
    try:
        with factory() as s:
            s.get(User, 2)
            commit_rename(world, "later")
            assert cached_name(s) == "user0"
        assert_cache_agrees(world)
    finally:
        oracle.dispose()
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_a_memoized_function_with_two_queries_stores_no_old_snapshot(
    world: dict[str, Any],
) -> None:
    """Inside one memoized call, a first query fixes the snapshot; a commit lands
    before the second query of another table... of the same transaction."""
    cache: Cache = world["cache"]
    engine = world["engine"].execution_options(isolation_level=RR)
    scoped = scoped_session(sessionmaker(engine, expire_on_commit=False))
    cache.attach(scoped)
    try:

        @cache.memoize(ttl=60)
        def both() -> tuple[int, str]:
            count = scoped.execute(text("SELECT count(*) FROM oc_addresses")).scalar_one()
            commit_rename(world, "between")
            name = scoped.scalars(select(User.name).where(User.id == 1)).one()
            return int(count), str(name)

        assert both() == (6, "user0")  # what the snapshot shows
        scoped.remove()
        assert both() == (6, "between")
    finally:
        scoped.remove()


# -- rollback -------------------------------------------------------------------------
WRITES: dict[str, Callable[[Session], None]] = {
    "bulk_update_mappings": lambda s: s.bulk_update_mappings(
        User, [{"id": 1, "name": "uncommitted"}]
    ),
    "core_on_session_connection": lambda s: s.connection().execute(
        update(User.__table__).where(User.__table__.c.id == 1).values(name="uncommitted")
    ),
    "driver_sql": lambda s: s.connection().exec_driver_sql(
        "UPDATE oc_users SET name = 'uncommitted' WHERE id = 1"
    ),
    "orm_flush": lambda s: (setattr(s.get(User, 1), "name", "uncommitted"), s.flush()),  # type: ignore[func-returns-value]
    "orm_dml": lambda s: s.execute(update(User).where(User.id == 1).values(name="uncommitted")),
}


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_rolled_back_write_is_never_stored(world: dict[str, Any], write: str) -> None:
    """A transaction that wrote anything, through any path, stores nothing: its cached
    reads see its own writes, and after rollback nobody sees them."""
    with world["Session"]() as s:
        WRITES[write](s)
        assert cached_name(s) == "uncommitted"  # read your own writes
        s.rollback()
    assert truth(world) == "user0"
    assert_cache_agrees(world)


def test_a_joined_session_rolled_back_with_its_outer_transaction(
    world: dict[str, Any],
) -> None:
    """SQLAlchemy's "join a Session into an external transaction" recipe: the session
    commits (a savepoint), the outer transaction rolls back."""
    engine = world["engine"]
    with engine.connect() as conn:
        outer = conn.begin()
        s = Session(bind=conn, join_transaction_mode="create_savepoint")
        user = s.get(User, 1)
        assert user is not None
        user.name = "inside-outer"
        s.commit()
        assert cached_name(s) == "inside-outer"
        s.close()
        with Session(bind=conn, join_transaction_mode="create_savepoint") as other:
            assert cached_name(other) == "inside-outer"
        outer.rollback()
    assert truth(world) == "user0"
    assert_cache_agrees(world)


# -- AUTOCOMMIT --------------------------------------------------------------------------
def test_autocommit_flush_then_rollback_leaves_nothing_stale(world: dict[str, Any]) -> None:
    """On AUTOCOMMIT each statement commits as it runs; rollback() undoes nothing."""
    assert_cache_agrees(world)
    auto = world["engine"].execution_options(isolation_level="AUTOCOMMIT")
    with sessionmaker(auto)() as s:
        user = s.get(User, 1)
        assert user is not None
        user.name = "autocommitted"
        s.flush()
        s.rollback()
    assert truth(world) == "autocommitted"
    assert_cache_agrees(world)


def test_core_on_an_autocommit_connection_is_seen(world: dict[str, Any]) -> None:
    assert_cache_agrees(world)
    with world["engine"].connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(update(User.__table__).where(User.__table__.c.id == 1).values(name="auto"))
        assert_cache_agrees(world)
        conn.exec_driver_sql("UPDATE oc_users SET name = 'auto2' WHERE id = 1")
        assert_cache_agrees(world)
    assert truth(world) == "auto2"


def test_a_failed_autocommit_statement_releases_its_lease(world: dict[str, Any]) -> None:
    """An autocommit statement takes a lease before it runs and releases it after; one
    that raised got no ``after_cursor_execute``, so its lease stayed until it expired
    and every store on its tags was refused meanwhile (found by review)."""
    from sqlalchemy.exc import IntegrityError

    cache: Cache = world["cache"]
    users = User.__table__
    auto = world["engine"].execution_options(isolation_level="AUTOCOMMIT")
    with auto.connect() as conn, pytest.raises(IntegrityError):
        conn.execute(update(users).where(users.c.id == 1).values(id=2))  # id 2 exists
    hits = cache.stats().hits
    for _ in range(2):  # a miss that stores, then a hit
        with world["Session"]() as s:
            assert cached_name(s) == truth(world)
    assert cache.stats().hits == hits + 1, "the store was refused: the lease is still held"


# -- values the call did not read from the database --------------------------------------
def test_memoize_over_the_identity_map_is_not_stored(world: dict[str, Any]) -> None:
    """``scoped.get(User, 1).name`` with the user already in the session: no query runs,
    so nothing ties the value to a generation; it must not outlive a commit."""
    cache: Cache = world["cache"]
    scoped = scoped_session(world["Session"])
    cache.attach(scoped)

    @cache.memoize(ttl=60)
    def name_of(user_id: int) -> str:
        user = scoped.get(User, user_id)
        assert user is not None
        return user.name

    @cache.memoize(ttl=60)
    def name_in(session: Session, user_id: int) -> str:
        user = session.get(User, user_id)
        assert user is not None
        return user.name

    try:
        scoped.get(User, 1)  # loaded before the calls
        assert name_of(1) == "user0"
        with world["Session"]() as mine:
            mine.get(User, 1)
            assert name_in(mine, 1) == "user0"
        commit_rename(world, "renamed")
        scoped.remove()
        assert name_of(1) == "renamed"
        with world["Session"]() as mine:
            assert name_in(mine, 1) == "renamed"
    finally:
        scoped.remove()


def test_fromcache_never_stores_unrefreshed_identity_map_rows(world: dict[str, Any]) -> None:
    """A query returns the identity-map instance without refreshing it: its attributes
    are as old as the earlier load, not as the generations read now."""
    Session = world["Session"]
    with Session() as s:
        s.get(User, 1)  # loaded with the old name
        commit_rename(world, "newer")
        s.scalars(select(User).where(User.id == 1).options(FromCache(ttl=60))).one()
    assert_cache_agrees(world)


def test_unattached_reads_are_not_cached_and_say_so(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    cache: Cache = world["cache"]
    other = sessionmaker(create_engine(world["engine"].url))  # never attached

    @cache.memoize(ttl=60)
    def name_of(user_id: int) -> str:
        with other() as s:
            return str(s.scalars(select(User.name).where(User.id == user_id)).one())

    with caplog.at_level("WARNING", logger="ormcache"):
        assert name_of(1) == "user0"
    assert "cache.attach()" in caplog.text
    with other() as s:
        s.execute(update(User).where(User.id == 1).values(name="unseen"))
        s.commit()
    assert name_of(1) == "unseen"
    with caplog.at_level("WARNING", logger="ormcache"), other() as s:
        caplog.clear()
        s.execute(select(User).where(User.id == 2).options(FromCache())).all()
        s.execute(select(User).where(User.id == 2).options(FromCache())).all()
    assert "FromCache on a session no cache is attached to" in caplog.text or (
        "cache.attach()" in caplog.text
    )
    other.kw["bind"].dispose()


def test_every_new_unattached_session_class_and_engine_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The warning is once per session class (and per engine for memoize), not once per
    memory address: a new sessionmaker whose class reuses a collected one's id is still
    a mistake worth naming."""
    import gc

    cache = Cache()
    current: list[Any] = []  # this round's unattached sessionmaker

    @cache.memoize(ttl=60)
    def name_of(user_id: int, round_: int) -> str:
        with current[0]() as s:
            return str(s.scalars(select(User.name).where(User.id == user_id)).one())

    seen: set[int] = set()
    reused = 0
    for round_ in range(40):
        engine = create_engine("sqlite://")
        Base.metadata.create_all(engine)
        seed(sessionmaker(engine))
        current[:] = [sessionmaker(engine)]  # never attached
        ids = {id(current[0].class_), id(engine)}
        reused += bool(ids & seen)
        seen |= ids
        caplog.clear()
        with caplog.at_level("WARNING", logger="ormcache"):
            name_of(1, round_)
            with current[0]() as s:
                s.execute(select(User).where(User.id == 2).options(FromCache())).all()
        assert "read through" in caplog.text, f"round {round_}: no warning for the engine"
        assert "FromCache on a session no cache is attached to" in caplog.text, (
            f"round {round_}: no warning for the session class"
        )
        engine.dispose()
        current.clear()
        del engine, s
        gc.collect()
    cache.close()
    # Otherwise this test proves nothing about ids (CPython reuses freed addresses).
    assert reused, "no id was reused in 40 rounds"


def test_deleting_an_object_loaded_by_fromcache_never_flushes_inside_a_flush(
    world: dict[str, Any],
) -> None:
    """The delete cascade lazy-loads the user's addresses inside the flush; FromCache
    must not reach that load (it would flush inside a flush)."""
    Session = world["Session"]
    stmt = select(User).where(User.id == 1).options(FromCache(ttl=60))
    for _ in range(2):  # a miss, then a hit
        with Session() as s:
            s.scalars(stmt).one()
    with Session() as s:
        user = s.scalars(stmt).one()
        s.delete(user)
        s.commit()
    with world["oracle"].connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM oc_users WHERE id = 1")).scalar() == 0
