"""Every write path invalidates, on every database and backend (README "Guarantees and
their limits", 3)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import sessionmaker

from ormcache import Cache, FromCache
from tests.models import Address, User, key_hash, seed
from tests.support.sql import SQLCounter


@pytest.fixture
def env(cache: Cache, db_engine: Any) -> tuple[Cache, Any, Any]:
    Session = sessionmaker(db_engine, expire_on_commit=False)
    cache.attach(Session)
    seed(Session)
    return cache, Session, db_engine


def lookups(cache: Cache, Session: Any) -> dict[str, Any]:
    """The two ways to cache the seed's lookup: memoize, and FromCache."""

    @cache.memoize(ttl=60)
    def memoized(api_key: str) -> str | None:
        with Session() as s:
            user = s.scalars(
                select(User).where(User.api_key_hash == key_hash(api_key))
            ).one_or_none()
            return None if user is None else f"{user.name}/{user.email}/{user.active}"

    def from_cache(api_key: str) -> str | None:
        with Session() as s:
            user = s.scalars(
                select(User)
                .where(User.api_key_hash == key_hash(api_key))
                .options(FromCache(ttl=60))
            ).one_or_none()
            return None if user is None else f"{user.name}/{user.email}/{user.active}"

    return {"memoize": memoized, "fromcache": from_cache}


def warm(fn: Any, *args: Any) -> Any:
    """Call twice; the second call must be a hit that runs no SQL."""
    first = fn(*args)
    assert fn(*args) == first
    return first


@pytest.mark.parametrize("how", ["memoize", "fromcache"])
def test_unit_of_work_update_invalidates(env: Any, how: str) -> None:
    """Changing any column of a row invalidates lookups of that row by its partition."""
    cache, Session, engine = env
    fn = lookups(cache, Session)[how]
    key = "key-0-secret"
    assert warm(fn, key) == "user0/user0@example.com/True"
    counter = SQLCounter(engine)
    assert fn(key) == "user0/user0@example.com/True"
    assert counter.count == 0
    with Session() as s:
        s.get(User, 1).name = "renamed"  # type: ignore[union-attr]
        s.commit()
    assert fn(key) == "renamed/user0@example.com/True"


@pytest.mark.parametrize("how", ["memoize", "fromcache"])
def test_unit_of_work_insert_invalidates_negative_entry(env: Any, how: str) -> None:
    """An unknown key is cached as "no user", and creating the user is seen at once."""
    import datetime as dt

    cache, Session, _ = env
    fn = lookups(cache, Session)[how]
    assert warm(fn, "brand-new") is None
    with Session() as s:
        s.add(
            User(
                id=99,
                name="new",
                email="new@example.com",
                api_key_hash=key_hash("brand-new"),
                created_at=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
            )
        )
        s.commit()
    assert fn("brand-new") == "new/new@example.com/True"


@pytest.mark.parametrize("how", ["memoize", "fromcache"])
def test_unit_of_work_delete_invalidates(env: Any, how: str) -> None:
    cache, Session, _ = env
    fn = lookups(cache, Session)[how]
    assert warm(fn, "key-1-secret") is not None
    with Session() as s:
        s.delete(s.get(User, 2))
        s.commit()
    assert fn("key-1-secret") is None


@pytest.mark.parametrize("how", ["memoize", "fromcache"])
def test_old_values_of_changed_rows_are_invalidated(env: Any, how: str) -> None:
    """Rotating a key: the old hash's cached lookup must stop answering."""
    cache, Session, _ = env
    fn = lookups(cache, Session)[how]
    assert warm(fn, "key-2-secret") is not None
    with Session() as s:
        s.get(User, 3).api_key_hash = key_hash("rotated")  # type: ignore[union-attr]
        s.commit()
    assert fn("key-2-secret") is None
    assert fn("rotated") == "user2/user2@example.com/True"


@pytest.mark.parametrize("how", ["memoize", "fromcache"])
@pytest.mark.parametrize(
    "path",
    [
        "orm_update",
        "orm_delete",
        "core_update",
        "core_delete",
        "core_insert",
        "text",
        "text_unknown",
    ],
)
def test_bulk_core_and_text_dml_invalidate(env: Any, how: str, path: str) -> None:
    """ORM-enabled update()/delete(), Core DML and text() DML through the session."""
    import datetime as dt

    cache, Session, _ = env
    fn = lookups(cache, Session)[how]
    target = "key-0-secret"
    if path == "core_insert":
        target = "inserted"
    before = warm(fn, target)
    with Session() as s:
        if path == "orm_update":
            s.execute(update(User).where(User.id == 1).values(active=False))
        elif path == "orm_delete":
            s.execute(delete(Address).where(Address.user_id == 1))
            s.execute(delete(User).where(User.id == 1))
        elif path == "core_update":
            s.execute(update(User.__table__).where(User.__table__.c.id == 1).values(active=False))
        elif path == "core_delete":
            s.execute(delete(Address.__table__).where(Address.__table__.c.user_id == 1))
            s.execute(delete(User.__table__).where(User.__table__.c.id == 1))
        elif path == "core_insert":
            s.execute(
                insert(User.__table__).values(
                    id=50,
                    name="ins",
                    email="ins@example.com",
                    api_key_hash=key_hash("inserted"),
                    active=True,
                    balance=0,
                    created_at=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
                )
            )
        elif path == "text":
            s.execute(text("UPDATE oc_users SET active = :a WHERE id = 1"), {"a": False})
        else:
            # A comment hides the table name: the whole namespace is invalidated.
            s.execute(
                text("UPDATE /* opaque */ oc_users SET active = :a WHERE id = 1"), {"a": False}
            )
        s.commit()
    after = fn(target)
    assert after != before
    if path in ("orm_update", "core_update", "text", "text_unknown"):
        assert after == "user0/user0@example.com/False"
    elif path == "core_insert":
        assert after == "ins/ins@example.com/True"
    else:
        assert after is None


def test_engine_attach_tracks_core_writes(cache: Cache, db_engine: Any) -> None:
    """Core-only code (engine.begin()) invalidates too when the Engine is attached."""
    Session = sessionmaker(db_engine)
    cache.attach(Session)
    cache.attach(db_engine)
    seed(Session)
    fn = lookups(cache, Session)["fromcache"]
    assert warm(fn, "key-0-secret") == "user0/user0@example.com/True"
    with db_engine.begin() as conn:
        conn.execute(update(User.__table__).where(User.__table__.c.id == 1).values(name="core"))
    assert fn("key-0-secret") == "core/user0@example.com/True"


@pytest.mark.parametrize("how", ["memoize", "fromcache"])
def test_manual_invalidation_of_model_and_instance(env: Any, how: str) -> None:
    """Writes ormcache cannot see are fixed by ``cache.invalidate(Model | instance)``."""
    from sqlalchemy import create_engine

    cache, Session, attached_engine = env
    # Another engine on the same database (another application): invisible to the cache.
    engine = create_engine(attached_engine.url)
    fn = lookups(cache, Session)[how]
    assert warm(fn, "key-0-secret") is not None
    with engine.begin() as conn:
        conn.execute(update(User.__table__).where(User.__table__.c.id == 1).values(name="x"))
    assert fn("key-0-secret").startswith("user0/")  # stale, as documented (TTL-bounded)
    cache.invalidate(User)
    assert fn("key-0-secret").startswith("x/")
    with engine.begin() as conn:
        conn.execute(update(User.__table__).where(User.__table__.c.id == 1).values(name="y"))
    with Session() as s:
        user = s.get(User, 1)
        assert user is not None
        cache.invalidate(user)
    assert fn("key-0-secret").startswith("y/")
    engine.dispose()


def test_read_your_writes_inside_a_transaction(env: Any) -> None:
    """Within a transaction that wrote a table, cached queries on it see the writes."""
    cache, Session, _engine = env
    fn = lookups(cache, Session)["fromcache"]
    warm(fn, "key-0-secret")
    with Session() as s:
        s.get(User, 1).name = "pending"  # type: ignore[union-attr]
        user = s.scalars(
            select(User).where(User.api_key_hash == key_hash("key-0-secret")).options(FromCache())
        ).one()
        assert user.name == "pending"
        s.rollback()
    assert fn("key-0-secret") == "user0/user0@example.com/True"
    assert fn("key-0-secret") == "user0/user0@example.com/True"


def test_closing_a_session_with_unflushed_writes_does_not_disable_the_cache(env: Any) -> None:
    """Regression: a session that flushed and was closed without commit or rollback left
    its "pending writes" marker behind, and every later call in that thread bypassed the
    cache."""
    cache, Session, _ = env
    fn = lookups(cache, Session)["memoize"]
    with Session() as s:
        s.get(User, 1).name = "flushed, never committed"  # type: ignore[union-attr]
        s.flush()
    assert fn("key-0-secret") == "user0/user0@example.com/True"
    hits = cache.stats().hits
    assert fn("key-0-secret") == "user0/user0@example.com/True"
    assert cache.stats().hits == hits + 1


def test_savepoints(env: Any) -> None:
    """Inside a savepoint cached reads see its writes; rolling the savepoint back restores
    the old data for the rest of the transaction; only the outer commit publishes, and
    what it publishes (the savepoint that was released) invalidates other readers."""
    cache, Session, engine = env
    fn = lookups(cache, Session)["fromcache"]
    stmt = select(User).where(User.api_key_hash == key_hash("key-0-secret")).options(FromCache())
    assert warm(fn, "key-0-secret") == "user0/user0@example.com/True"
    with Session() as s:
        with s.begin_nested():
            s.get(User, 1).name = "in-savepoint"  # type: ignore[union-attr]
            s.flush()
            assert s.scalars(stmt).one().name == "in-savepoint"
            s.rollback()  # the savepoint only
        s.expire_all()
        assert s.scalars(stmt).one().name == "user0"
        # Another session still reads (and may cache) the committed data meanwhile.
        assert fn("key-0-secret") == "user0/user0@example.com/True"
        with s.begin_nested():
            s.get(User, 1).name = "released"  # type: ignore[union-attr]
        if engine.dialect.name != "sqlite":
            # pysqlite's RELEASE of the outermost savepoint commits (see the README).
            assert fn("key-0-secret") == "user0/user0@example.com/True"  # not committed yet
        s.commit()
    assert fn("key-0-secret") == "released/user0@example.com/True"
    assert fn("key-0-secret") == "released/user0@example.com/True"


def test_a_secret_keys_every_hash_and_invalidation_still_works(
    cache_url: str, namespace: str, db_engine: Any
) -> None:
    """With ``secret``, hashes in key names and partition tags are keyed (a Redis reader
    cannot confirm a guessed value), and readers and writers still agree on them."""
    from ormcache.sqla.tags import partition_tag

    cache = Cache(cache_url, namespace=namespace, strict=True, secret="s3cret")
    Session = sessionmaker(db_engine, expire_on_commit=False)
    cache.attach(Session)
    seed(Session)
    fn = lookups(cache, Session)["memoize"]
    plain = Cache(namespace=namespace + "p")

    @plain.memoize
    def memoized(api_key: str) -> None:
        return None

    assert (
        fn.cache_key("key-0-secret").rsplit(":", 1)[1]
        != memoized.cache_key("key-0-secret").rsplit(":", 1)[1]
    )
    table = User.__table__
    column = table.c.api_key_hash
    assert partition_tag(table, column, "x") != partition_tag(
        table, column, "x", cache._core.codec.hash_salt
    )
    assert warm(fn, "key-0-secret") == "user0/user0@example.com/True"
    with Session() as s:
        s.get(User, 1).email = "changed@example.com"  # type: ignore[union-attr]
        s.commit()
    assert fn("key-0-secret") == "user0/changed@example.com/True"
    ffc = lookups(cache, Session)["fromcache"]
    assert warm(ffc, "key-0-secret") == "user0/changed@example.com/True"
    with Session() as s:
        s.get(User, 1).active = False  # type: ignore[union-attr]
        s.commit()
    assert ffc("key-0-secret") == "user0/changed@example.com/False"
    cache.clear()
    cache.close()


@pytest.mark.parametrize("how", ["memoize", "fromcache"])
def test_case_insensitive_collations_do_not_hide_writes(env: Any, how: str) -> None:
    """Regression: MariaDB's default collation matches 'USER0@…' to the row 'user0@…'.
    A partition tag hashed from the query's spelling never heard the row's writes, so
    the cached lookup stayed stale."""
    cache, Session, engine = env

    @cache.memoize(ttl=60)
    def by_email_memo(email: str) -> str | None:
        with Session() as s:
            user = s.scalars(select(User).where(User.email == email)).one_or_none()
            return None if user is None else user.name

    def by_email_fc(email: str) -> str | None:
        with Session() as s:
            user = s.scalars(
                select(User).where(User.email == email).options(FromCache())
            ).one_or_none()
            return None if user is None else user.name

    fn = by_email_memo if how == "memoize" else by_email_fc
    spelled = "USER0@example.com"
    first = warm(fn, spelled)
    with Session() as s:
        s.get(User, 1).name = "renamed"  # type: ignore[union-attr]
        s.commit()
    if engine.dialect.name in ("mysql", "mariadb"):
        assert first == "user0"
        assert fn(spelled) == "renamed"
    else:
        assert first is None
        assert fn(spelled) is None


def test_trailing_spaces_share_a_partition() -> None:
    """PAD SPACE collations match 'k' and 'k  ': their partition tags must be the same."""
    from ormcache.sqla.tags import partition_tag

    table = User.__table__
    col = table.c.api_key_hash
    assert partition_tag(table, col, "k") == partition_tag(table, col, "k  ")
    assert partition_tag(table, col, "k") != partition_tag(table, col, " k")
