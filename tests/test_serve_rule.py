"""Serve rule and key: a hit must be what the statement would do, and the key holds
everything that changes the result (README "Guarantees and their limits").

The oracle is the database: statements that must never be served run SQL every time,
and keyed variants (tenants, callable binds, databases) each get their own answer.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Sequence,
    bindparam,
    create_engine,
    event,
    func,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, sessionmaker, with_loader_criteria

from ormcache import Cache, FromCache
from tests.models import Base, User, seed
from tests.support.sql import SQLCounter


@pytest.fixture(params=["postgres", "mariadb"])
def server(request: pytest.FixtureRequest, cache: Cache) -> Iterator[dict[str, Any]]:
    url = str(request.getfixturevalue(f"{request.param}_url"))
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine, expire_on_commit=False)
    seed(factory)
    cache.attach(factory)
    yield {"cache": cache, "engine": engine, "Session": factory, "counter": SQLCounter(engine)}
    Base.metadata.drop_all(engine)
    engine.dispose()


def runs_sql_every_time(world: dict[str, Any], build: Callable[[], Any]) -> None:
    counter: SQLCounter = world["counter"]
    for _ in range(3):
        with world["Session"]() as s:
            counter.reset()
            s.execute(build()).all()
            assert counter.count >= 1, "served from the cache"


def is_served(world: dict[str, Any], build: Callable[[], Any]) -> None:
    counter: SQLCounter = world["counter"]
    with world["Session"]() as s:
        s.execute(build()).all()
    with world["Session"]() as s:
        counter.reset()
        s.execute(build()).all()
        assert counter.count == 0


LOCKING = {
    "for_update": lambda q: q.with_for_update(),
    "for_share": lambda q: q.with_for_update(read=True),
    "nowait": lambda q: q.with_for_update(nowait=True),
    "skip_locked": lambda q: q.with_for_update(skip_locked=True),
    "of": lambda q: q.with_for_update(of=User),
}


@pytest.mark.parametrize("lock", sorted(LOCKING))
def test_locking_reads_are_never_served(server: dict[str, Any], lock: str) -> None:
    if lock == "for_share" and server["engine"].dialect.name != "postgresql":
        pass  # MariaDB spells it LOCK IN SHARE MODE: still a locking read
    runs_sql_every_time(
        server, lambda: LOCKING[lock](select(User).where(User.id == 1).options(FromCache()))
    )


def test_skip_locked_workers_get_different_rows(server: dict[str, Any]) -> None:
    """Two queue workers with SKIP LOCKED: a hit would take no lock, and both would get
    row 1."""
    Session = server["Session"]
    stmt = (
        select(User.id)
        .order_by(User.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .options(FromCache(ttl=60))
    )
    with Session() as warm:
        warm.execute(stmt).all()
        warm.rollback()
    first = Session()
    second = Session()
    try:
        a = first.execute(stmt).scalar_one()
        b = second.execute(stmt).scalar_one()
        assert a != b
    finally:
        first.rollback()
        second.rollback()
        first.close()
        second.close()


NON_DETERMINISTIC = {
    "now": lambda: select(User.id, func.now()).options(FromCache()),
    "NOW": lambda: select(User.id, func.NOW()).options(FromCache()),
    "current_timestamp": lambda: (
        select(User.id).where(User.created_at < func.current_timestamp()).options(FromCache())
    ),
    "random": lambda: select(User.id).order_by(func.random()).options(FromCache()),
    "rand": lambda: select(User.id).order_by(func.rand()).options(FromCache()),
    "current_user": lambda: select(User.id, func.current_user()).options(FromCache()),
    "literal_now": lambda: (
        select(User.id).where(User.created_at < literal_column("now()")).options(FromCache())
    ),
    "user_function": lambda: select(User.id, func.my_app_fn(User.id)).options(FromCache()),
}


@pytest.mark.parametrize("name", sorted(NON_DETERMINISTIC))
def test_non_deterministic_statements_are_never_served(server: dict[str, Any], name: str) -> None:
    dialect = server["engine"].dialect.name
    if name == "random" and dialect != "postgresql":
        pytest.skip("MariaDB spells it rand()")
    if name == "rand" and dialect == "postgresql":
        pytest.skip("PostgreSQL spells it random()")
    if name == "user_function":
        ddl = (
            "CREATE OR REPLACE FUNCTION my_app_fn(x integer) RETURNS integer "
            "LANGUAGE sql AS 'SELECT x'"
            if dialect == "postgresql"
            else "CREATE OR REPLACE FUNCTION my_app_fn(x INT) RETURNS INT DETERMINISTIC RETURN x"
        )
        with server["engine"].begin() as conn:
            conn.exec_driver_sql(ddl)
    runs_sql_every_time(server, NON_DETERMINISTIC[name])


def test_sequences_are_never_served(cache: Cache, postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    seq = Sequence("oc_serve_seq")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SEQUENCE IF EXISTS oc_serve_seq")
        conn.exec_driver_sql("CREATE SEQUENCE oc_serve_seq")
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        values = []
        for _ in range(3):
            with factory() as s:
                values.append(s.execute(select(seq.next_value()).options(FromCache())).scalar())
        assert values == sorted(set(values))
        assert len(values) == 3
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SEQUENCE IF EXISTS oc_serve_seq")
        engine.dispose()


def test_time_functions_are_served_when_allowed(server: dict[str, Any]) -> None:
    """The documented per-query opt-in: an answer ``ttl`` seconds old is acceptable."""
    is_served(
        server,
        lambda: (
            select(User.id)
            .where(User.created_at < func.now())
            .options(FromCache(ttl=5, allow_time=True))
        ),
    )
    # The opt-in is for time only: random() is still refused.
    rnd = func.random() if server["engine"].dialect.name == "postgresql" else func.rand()
    runs_sql_every_time(
        server,
        lambda: select(User.id).order_by(rnd).options(FromCache(ttl=5, allow_time=True)),
    )


def test_memoized_time_dependent_query_is_not_stored(server: dict[str, Any]) -> None:
    cache: Cache = server["cache"]
    Session = server["Session"]
    calls = {"n": 0}

    @cache.memoize(ttl=60)
    def active_ids() -> list[int]:
        calls["n"] += 1
        with Session() as s:
            return list(s.scalars(select(User.id).where(User.created_at < func.now())))

    @cache.memoize(ttl=60, allow_time=True)
    def active_ids_allowed() -> list[int]:
        calls["n"] += 1
        with Session() as s:
            return list(s.scalars(select(User.id).where(User.created_at < func.now())))

    assert active_ids() == active_ids() == [1, 2, 3]
    assert calls["n"] == 2
    assert active_ids_allowed() == active_ids_allowed() == [1, 2, 3]
    assert calls["n"] == 3


def test_a_writable_cte_goes_through_the_write_path(cache: Cache, postgres_url: str) -> None:
    """``select()`` over ``update().returning().cte()`` writes: never served, and what it
    changed is invalidated."""
    engine = create_engine(postgres_url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    seed(factory)
    cache.attach(factory)
    counter = SQLCounter(engine)
    name_stmt = select(User.name).where(User.id == 1).options(FromCache(ttl=60))
    try:
        with factory() as s:
            assert s.execute(name_stmt).scalar_one() == "user0"
        for i in range(2):
            cte = (
                update(User).where(User.id == 1).values(name=f"cte{i}").returning(User.id).cte("u")
            )
            with factory() as s:
                counter.reset()
                s.execute(select(cte.c.id).options(FromCache())).all()
                assert counter.count == 1
                s.commit()
            with factory() as s:
                assert s.execute(name_stmt).scalar_one() == f"cte{i}"
        with factory() as s:
            s.execute(
                text(
                    "WITH u AS (UPDATE oc_users SET name = 'txt' WHERE id = 1 "
                    "RETURNING id) SELECT id FROM u"
                )
            ).all()
            s.commit()
        with factory() as s:
            assert s.execute(name_stmt).scalar_one() == "txt"
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


# -- the key holds everything that changes the result ------------------------------------
def test_schema_translate_map_is_part_of_the_key(cache: Cache, postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        for schema in ("oc_tenant_a", "oc_tenant_b"):
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        for schema in ("oc_tenant_a", "oc_tenant_b"):
            tenant = engine.execution_options(schema_translate_map={None: schema})
            Base.metadata.create_all(tenant)
            with Session(tenant) as s:
                s.add(User(id=1, name=schema, email="e", api_key_hash="h", created_at=func.now()))
                s.commit()
        factory = sessionmaker(engine)
        cache.attach(factory)
        stmt = select(User.name).where(User.id == 1).options(FromCache(ttl=60))
        for _ in range(2):
            for schema in ("oc_tenant_a", "oc_tenant_b"):
                with factory() as s:
                    name = s.execute(
                        stmt, execution_options={"schema_translate_map": {None: schema}}
                    ).scalar_one()
                    assert name == schema
        for schema in ("oc_tenant_a", "oc_tenant_b"):
            tenant_engine = engine.execution_options(schema_translate_map={None: schema})
            tenant_factory = sessionmaker(tenant_engine)
            cache.attach(tenant_factory)
            with tenant_factory() as s:
                assert s.execute(stmt).scalar_one() == schema
    finally:
        with engine.begin() as conn:
            for schema in ("oc_tenant_a", "oc_tenant_b"):
                conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        engine.dispose()


def test_search_path_is_part_of_the_key(cache: Cache, postgres_url: str) -> None:
    admin = create_engine(postgres_url)
    with admin.begin() as conn:
        for schema in ("oc_sp_a", "oc_sp_b"):
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
            conn.exec_driver_sql(f"CREATE TABLE {schema}.oc_users_sp (id int, name text)")
            conn.exec_driver_sql(f"INSERT INTO {schema}.oc_users_sp VALUES (1, '{schema}')")
    engines = {
        schema: create_engine(postgres_url, connect_args={"options": f"-csearch_path={schema}"})
        for schema in ("oc_sp_a", "oc_sp_b")
    }
    from sqlalchemy import Column, Integer, MetaData, String, Table

    table = Table(
        "oc_users_sp", MetaData(), Column("id", Integer, primary_key=True), Column("name", String)
    )
    stmt = select(table.c.name).where(table.c.id == 1).options(FromCache(ttl=60))
    try:
        for engine in engines.values():
            cache.attach(sessionmaker(engine))
        for _ in range(2):
            for schema, engine in engines.items():
                factory = sessionmaker(engine)
                cache.attach(factory)
                with factory() as s:
                    assert s.execute(stmt).scalar_one() == schema
    finally:
        for engine in engines.values():
            engine.dispose()
        with admin.begin() as conn:
            for schema in ("oc_sp_a", "oc_sp_b"):
                conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.dispose()


@pytest.mark.parametrize("order", ["hook_after_attach", "hook_before_attach"])
def test_a_tenant_hook_applies_to_hits_whatever_its_order(
    cache: Cache, sqlite_engine: Any, order: str
) -> None:
    """A ``do_orm_execute`` hook that adds a tenant filter changes the result: the key
    and every hit reflect it, whether it was registered before or after attach()."""
    factory = sessionmaker(sqlite_engine)
    seed(factory)
    tenant = threading.local()

    def tenant_filter(state: Any) -> None:
        if state.is_select and getattr(tenant, "max_id", None) is not None:
            state.statement = state.statement.options(
                with_loader_criteria(User, User.id <= tenant.max_id)
            )

    if order == "hook_before_attach":
        event.listen(factory, "do_orm_execute", tenant_filter)
        cache.attach(factory)
    else:
        cache.attach(factory)
        event.listen(factory, "do_orm_execute", tenant_filter)
    stmt = select(User).order_by(User.id).options(FromCache(ttl=60))
    for _ in range(2):
        for max_id, expected in ((1, [1]), (2, [1, 2]), (None, [1, 2, 3])):
            tenant.max_id = max_id
            with factory() as s:
                assert [u.id for u in s.scalars(stmt)] == expected


def test_callable_binds_are_resolved_per_execution(cache: Cache, sqlite_engine: Any) -> None:
    factory = sessionmaker(sqlite_engine)
    seed(factory)
    cache.attach(factory)
    current = {"id": 1}
    stmt = (
        select(User.name)
        .where(User.id == bindparam("uid", callable_=lambda: current["id"]))
        .options(FromCache(ttl=60))
    )
    for _ in range(2):
        for uid in (1, 2, 3):
            current["id"] = uid
            with factory() as s:
                assert s.execute(stmt).scalar_one() == f"user{uid - 1}"


def test_in_memory_sqlite_databases_never_share_entries(cache: Cache) -> None:
    """An engine's id() can be reused once it is gone; a new, empty database must never
    be served the old one's rows."""
    stmt = select(User.name).where(User.id == 1).options(FromCache(ttl=60))
    for trial in range(20):
        engine = create_engine("sqlite://")
        Base.metadata.create_all(engine)
        factory = sessionmaker(engine)
        cache.attach(factory)
        if trial % 2 == 0:
            seed(factory)
            with factory() as s:
                assert s.execute(stmt).scalar_one() == "user0"
        else:
            with factory() as s:
                assert s.execute(stmt).scalar_one_or_none() is None
        cache.detach(factory)
        engine.dispose()
        del engine, factory
        gc.collect()


def test_memoize_under_a_schema_translate_map_is_not_stored(
    cache: Cache, postgres_url: str
) -> None:
    """A memoize key holds the function and its arguments, not the tenant's schema: a
    call that read under a schema map must not answer for another tenant."""
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        for schema in ("oc_memo_a", "oc_memo_b"):
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        factories = {}
        for schema in ("oc_memo_a", "oc_memo_b"):
            tenant = engine.execution_options(schema_translate_map={None: schema})
            Base.metadata.create_all(tenant)
            with Session(tenant) as s:
                s.add(User(id=1, name=schema, email="e", api_key_hash="h", created_at=func.now()))
                s.commit()
            factories[schema] = sessionmaker(tenant)
            cache.attach(factories[schema])
        current = {"schema": "oc_memo_a"}

        @cache.memoize(ttl=60)
        def name_of(user_id: int) -> str:
            with factories[current["schema"]]() as s:
                return str(s.scalars(select(User.name).where(User.id == user_id)).one())

        for _ in range(2):
            for schema in ("oc_memo_a", "oc_memo_b"):
                current["schema"] = schema
                assert name_of(1) == schema
    finally:
        with engine.begin() as conn:
            for schema in ("oc_memo_a", "oc_memo_b"):
                conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        engine.dispose()
