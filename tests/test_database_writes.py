"""Writes the database makes on its own are seen (README "Writes the database makes on its
own"; issue 11, section 1).

Foreign-key actions, triggers, views and routines write tables that no statement of the
application names. The schema here is made by raw DDL, as a migration would make it: the
models know nothing of the actions and triggers, so what is seen comes from the
database's catalog. Each test warms cached reads, writes through an attached session,
and compares the reads with a fresh read on an engine the cache does not watch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import String, create_engine, event, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from ormcache import Cache, FromCache
from tests.support.sql import SQLCounter


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "dw_parent"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code: Mapped[int] = mapped_column(unique=True)


class Child(Base):
    """ON DELETE CASCADE in the database only."""

    __tablename__ = "dw_child"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(index=True)


class Kid(Base):
    """ON UPDATE CASCADE and ON DELETE SET NULL in the database only."""

    __tablename__ = "dw_kid"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_code: Mapped[int | None] = mapped_column(index=True)


class Counter(Base):
    """Written by a trigger on dw_parent, and by routines."""

    __tablename__ = "dw_counter"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    hits: Mapped[int]


class Other(Base):
    """Written by nothing here: its cached reads must survive every test's writes."""

    __tablename__ = "dw_other"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


TABLES = """
CREATE TABLE dw_parent (id int PRIMARY KEY, code int NOT NULL UNIQUE);
CREATE TABLE dw_child (id int PRIMARY KEY, parent_id int NOT NULL,
    FOREIGN KEY (parent_id) REFERENCES dw_parent (id) ON DELETE CASCADE);
CREATE TABLE dw_kid (id int PRIMARY KEY, parent_code int,
    FOREIGN KEY (parent_code) REFERENCES dw_parent (code) ON UPDATE CASCADE ON DELETE SET NULL);
CREATE TABLE dw_counter (id int PRIMARY KEY, hits int NOT NULL);
CREATE TABLE dw_other (id int PRIMARY KEY, name varchar(50) NOT NULL);
CREATE VIEW dw_counter_view AS SELECT id, hits FROM dw_counter;
INSERT INTO dw_parent VALUES (1, 10), (2, 20);
INSERT INTO dw_child VALUES (1, 1), (2, 1), (3, 2);
INSERT INTO dw_kid VALUES (1, 10), (2, 20);
INSERT INTO dw_counter VALUES (1, 0);
INSERT INTO dw_other VALUES (1, 'other')
"""

TRIGGER = {
    "postgresql": [
        "CREATE FUNCTION dw_count() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF TG_OP = 'INSERT' THEN UPDATE dw_counter SET hits = hits + 1"
        " WHERE id = 1; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER dw_parent_count AFTER INSERT ON dw_parent"
        " FOR EACH ROW EXECUTE FUNCTION dw_count()",
    ],
    "mysql": [
        "CREATE TRIGGER dw_parent_count AFTER INSERT ON dw_parent FOR EACH ROW"
        " BEGIN UPDATE dw_counter SET hits = hits + 1 WHERE id = 1; END",
    ],
    "sqlite": [
        "CREATE TRIGGER dw_parent_count AFTER INSERT ON dw_parent"
        " BEGIN UPDATE dw_counter SET hits = hits + 1 WHERE id = 1; END",
    ],
}

ROUTINES = {
    "postgresql": [
        "CREATE FUNCTION dw_bump() RETURNS int LANGUAGE plpgsql AS $$"
        " BEGIN UPDATE dw_counter SET hits = hits + 10 WHERE id = 1; RETURN 1; END $$",
        "CREATE FUNCTION dw_stable(x int) RETURNS int LANGUAGE sql STABLE AS $$"
        " SELECT x + count(*)::int FROM dw_counter $$",
        "CREATE FUNCTION dw_dynamic() RETURNS int LANGUAGE plpgsql AS $$"
        " BEGIN EXECUTE 'UPDATE dw_counter SET hits = hits + 100 WHERE id = 1';"
        " RETURN 1; END $$",
        "CREATE PROCEDURE dw_proc() LANGUAGE plpgsql AS $$ BEGIN PERFORM dw_bump(); END $$",
    ],
    "mysql": [
        "CREATE FUNCTION dw_bump() RETURNS int MODIFIES SQL DATA"
        " BEGIN UPDATE dw_counter SET hits = hits + 10 WHERE id = 1; RETURN 1; END",
        "CREATE FUNCTION dw_stable(x int) RETURNS int READS SQL DATA"
        " RETURN x + (SELECT count(*) FROM dw_counter)",
        "CREATE PROCEDURE dw_dynamic()"
        " BEGIN UPDATE dw_counter SET hits = hits + 100 WHERE id = 1;"
        " EXECUTE IMMEDIATE 'SELECT 1'; END",
        "CREATE PROCEDURE dw_proc() BEGIN DO dw_bump(); END",
    ],
}

DROP = [
    "DROP VIEW IF EXISTS dw_counter_view",
    *(f"DROP TABLE IF EXISTS {t}" for t in ("dw_kid", "dw_child", "dw_parent")),
    "DROP TABLE IF EXISTS dw_counter",
    "DROP TABLE IF EXISTS dw_other",
]
DROP_ROUTINES = {
    "postgresql": [
        "DROP FUNCTION IF EXISTS dw_count() CASCADE",
        "DROP FUNCTION IF EXISTS dw_bump() CASCADE",
        "DROP FUNCTION IF EXISTS dw_stable(int)",
        "DROP FUNCTION IF EXISTS dw_dynamic()",
        "DROP PROCEDURE IF EXISTS dw_proc()",
    ],
    "mysql": [
        "DROP FUNCTION IF EXISTS dw_bump",
        "DROP FUNCTION IF EXISTS dw_stable",
        "DROP PROCEDURE IF EXISTS dw_dynamic",
        "DROP PROCEDURE IF EXISTS dw_proc",
    ],
}


def kind(engine: Any) -> str:
    name = engine.dialect.name
    return "mysql" if name in ("mysql", "mariadb") else name


def run_ddl(engine: Any, statements: list[str]) -> None:
    with engine.begin() as conn:
        for sql in statements:
            conn.exec_driver_sql(sql)


@pytest.fixture
def schema(db_engine: Any) -> Iterator[Any]:
    """The tables, made by raw DDL; an oracle engine the cache does not watch. On SQLite
    foreign keys are enforced per connection, so every connection turns them on."""
    engine = db_engine
    if kind(engine) == "sqlite":
        event.listen(engine, "connect", lambda c, _: c.execute("PRAGMA foreign_keys = ON"))
        engine.dispose()
    drops = DROP_ROUTINES.get(kind(engine), [])
    run_ddl(engine, drops + DROP)
    run_ddl(engine, [s for s in TABLES.split(";\n")])
    oracle = create_engine(engine.url)
    if kind(engine) == "sqlite":
        event.listen(oracle, "connect", lambda c, _: c.execute("PRAGMA foreign_keys = ON"))
    yield oracle
    oracle.dispose()
    run_ddl(engine, DROP + drops)


class Reads:
    """Cached reads of each table (memoized and FromCache) and the same from the oracle."""

    def __init__(self, cache: Cache, Session: Any, oracle: Any) -> None:
        self.Session = Session
        self.oracle = sessionmaker(oracle)
        self.queries: dict[str, Callable[[], Any]] = {
            "children": lambda: select(Child.id).where(Child.parent_id == 1).order_by(Child.id),
            "kids": lambda: select(Kid.parent_code).where(Kid.id == 1),
            "counter": lambda: select(Counter.hits).where(Counter.id == 1),
            "other": lambda: select(Other.name).where(Other.id == 1),
        }
        self.memo = cache.memoize(ttl=60)(self._database)

    def _database(self, name: str) -> list[Any]:
        with self.Session() as s:
            return list(s.scalars(self.queries[name]()))

    def fromcache(self, name: str) -> list[Any]:
        with self.Session() as s:
            return list(s.scalars(self.queries[name]().options(FromCache())))

    def truth(self, name: str) -> list[Any]:
        with self.oracle() as s:
            return list(s.scalars(self.queries[name]()))

    def warm(self, *names: str) -> None:
        for name in names:
            for fn in (self.memo, self.fromcache):
                assert fn(name) == self.truth(name)
                assert fn(name) == self.truth(name)

    def check(self, *names: str) -> None:
        for name in names:
            assert self.memo(name) == self.truth(name), name
            assert self.fromcache(name) == self.truth(name), name


@pytest.fixture
def env(cache: Cache, db_engine: Any, schema: Any) -> tuple[Cache, Any, Reads]:
    Session = sessionmaker(db_engine, expire_on_commit=False)
    cache.attach(Session)
    return cache, Session, Reads(cache, Session, schema)


def hits_of(engine: Any, reads: Reads, name: str) -> int:
    """Statements the cached reads of ``name`` send: 0 when both are hits."""
    counter = SQLCounter(engine)
    reads.memo(name)
    reads.fromcache(name)
    return counter.count


@pytest.mark.parametrize("how", ["orm", "core", "driver"])
def test_on_delete_cascade_from_the_catalog(env: Any, db_engine: Any, how: str) -> None:
    """Regression (issue 11): deleting a parent deletes its children in the database
    (``passive_deletes``, or no relationship at all); cached reads of the children
    stayed stale."""
    _cache, Session, reads = env
    reads.warm("children", "kids", "other")
    with Session() as s:
        if how == "orm":
            s.delete(s.get(Parent, 1))
        elif how == "core":
            s.execute(Parent.__table__.delete().where(Parent.__table__.c.id == 1))
        else:
            s.connection().exec_driver_sql("DELETE FROM dw_parent WHERE id = 1")
        s.commit()
    assert reads.truth("children") == []
    assert reads.truth("kids") == [None]  # ON DELETE SET NULL
    reads.check("children", "kids")
    assert hits_of(db_engine, reads, "other") == 0


def test_on_update_cascade_from_the_catalog(env: Any, db_engine: Any) -> None:
    _cache, Session, reads = env
    reads.warm("kids")
    with Session() as s:
        parent = s.get(Parent, 1)
        assert parent is not None
        parent.code = 11
        s.commit()
    assert reads.truth("kids") == [11]
    reads.check("kids")


def test_metadata_foreign_key_actions_without_a_catalog(cache: Cache, namespace: str) -> None:
    """Where the catalog shows nothing (here SQLite without foreign keys turned on, so
    the ORM itself is told), ``ForeignKey(ondelete=...)`` in the models is followed."""
    from sqlalchemy import ForeignKey

    from ormcache.sqla.catalog import dependent_writes, note_metadata

    class MBase(DeclarativeBase):
        pass

    class MParent(MBase):
        __tablename__ = "dwm_parent"
        id: Mapped[int] = mapped_column(primary_key=True)

    class MChild(MBase):
        __tablename__ = "dwm_child"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(ForeignKey("dwm_parent.id", ondelete="CASCADE"))

    class MGrand(MBase):
        __tablename__ = "dwm_grand"
        id: Mapped[int] = mapped_column(primary_key=True)
        child_id: Mapped[int] = mapped_column(ForeignKey("dwm_child.id", onupdate="CASCADE"))

    note_metadata(MBase.metadata)
    tags = dependent_writes(None, {"t:dwm_parent"})
    assert {"t:dwm_child", "a:dwm_child", "t:dwm_grand", "a:dwm_grand"} <= tags
    assert dependent_writes(None, {"t:dwm_grand"}) == {"t:dwm_grand"}


@pytest.mark.parametrize("how", ["orm", "driver"])
def test_trigger_writes_are_seen(env: Any, db_engine: Any, how: str) -> None:
    """Regression (issue 11): an insert into A whose trigger updates B left cached reads
    of B stale. Reads through a view of B change with it too."""
    cache, Session, reads = env
    run_ddl(db_engine, TRIGGER[kind(db_engine)])
    reads.warm("counter", "other")
    view = "SELECT hits FROM dw_counter_view WHERE id = 1"

    @cache.memoize(ttl=60)
    def through_view() -> int:
        with Session() as s:
            return int(s.execute(text(view)).scalar_one())

    assert through_view() == through_view() == 0
    with Session() as s:
        if how == "orm":
            s.add(Parent(id=3, code=30))
        else:
            s.connection().exec_driver_sql("INSERT INTO dw_parent VALUES (3, 30)")
        s.commit()
    assert reads.truth("counter") == [1]
    reads.check("counter")
    assert through_view() == 1
    assert hits_of(db_engine, reads, "other") == 0


def test_trigger_created_after_the_catalog_was_read(env: Any, db_engine: Any) -> None:
    """DDL through a watched engine marks its catalog stale: a trigger created after the
    first write is followed from the next write on."""
    _cache, Session, reads = env
    with Session() as s:
        s.add(Parent(id=4, code=40))  # the catalog is read here, before the trigger
        s.commit()
    run_ddl(db_engine, TRIGGER[kind(db_engine)])
    reads.warm("counter")
    with Session() as s:
        s.add(Parent(id=5, code=50))
        s.commit()
    reads.check("counter")


def test_write_through_an_updatable_view(env: Any, db_engine: Any) -> None:
    _cache, Session, reads = env
    if kind(db_engine) == "sqlite":
        pytest.skip("SQLite views are read-only")
    reads.warm("counter", "other")
    with Session() as s:
        s.execute(text("UPDATE dw_counter_view SET hits = 7 WHERE id = 1"))
        s.commit()
    reads.check("counter")
    assert hits_of(db_engine, reads, "other") == 0


def routines(db_engine: Any) -> None:
    if kind(db_engine) == "sqlite":
        pytest.skip("SQLite has no stored routines")
    run_ddl(db_engine, ROUTINES[kind(db_engine)])


@pytest.mark.parametrize("how", ["select", "text", "call"])
def test_routine_writes_from_its_body_do_not_punish_other_reads(
    env: Any, db_engine: Any, how: str
) -> None:
    """``SELECT dw_bump()`` and ``CALL dw_proc()`` write what their bodies write (read
    from the catalog), not the whole namespace: reads of other tables stay cached."""
    _cache, Session, reads = env
    routines(db_engine)
    reads.warm("counter", "other")
    with Session() as s:
        if how == "select":
            s.execute(select(func.dw_bump()))
        elif how == "text":
            s.execute(text("SELECT dw_bump()"))
        else:
            s.execute(text("CALL dw_proc()"))
        s.commit()
    assert reads.truth("counter") == [10]
    reads.check("counter")
    assert hits_of(db_engine, reads, "other") == 0


def test_read_only_routine_is_neither_a_write_nor_cached(env: Any, db_engine: Any) -> None:
    """A STABLE PostgreSQL function (on MariaDB: a body with no writes) writes nothing:
    calling it invalidates nothing. What it returns depends on tables it reads, so a
    memoized read calling it is not stored."""
    cache, Session, reads = env
    routines(db_engine)
    reads.warm("other")

    @cache.memoize(ttl=60)
    def stable() -> int:
        with Session() as s:
            return int(s.execute(select(func.dw_stable(1))).scalar_one())

    assert stable() == 2
    assert hits_of(db_engine, reads, "other") == 0
    outside = create_engine(db_engine.url)
    with sessionmaker(outside)() as s:
        s.execute(text("INSERT INTO dw_counter VALUES (2, 0)"))
        s.commit()
    outside.dispose()
    assert stable() == 3


def test_undeclared_dynamic_routine_writes_everything_until_declared(
    env: Any, db_engine: Any
) -> None:
    """A routine whose writes cannot be read (dynamic SQL) writes the whole namespace;
    ``cache.declare_writes("dw_dynamic()", writes=[...])`` narrows it."""
    cache, Session, reads = env
    routines(db_engine)
    call = "CALL dw_dynamic()" if kind(db_engine) == "mysql" else "SELECT dw_dynamic()"
    reads.warm("counter", "other")
    with Session() as s:
        s.execute(text(call))
        s.commit()
    reads.check("counter")
    assert hits_of(db_engine, reads, "other") > 0  # the namespace was bumped
    cache.declare_writes("dw_dynamic()", writes=[Counter])
    reads.warm("counter", "other")
    with Session() as s:
        s.execute(text(call))
        s.commit()
    reads.check("counter")
    assert hits_of(db_engine, reads, "other") == 0


def test_declared_table_dependency(env: Any, db_engine: Any) -> None:
    """``cache.declare_writes("dw_other", writes=["dw_counter"])``: a dependency no
    catalog shows (a trigger the database user cannot see, another database)."""
    cache, Session, reads = env
    cache.declare_writes(Other, writes=["dw_counter"])
    reads.warm("counter")
    outside = create_engine(db_engine.url)
    with sessionmaker(outside)() as s:
        s.execute(text("UPDATE dw_counter SET hits = 5"))  # unseen: another application
        s.commit()
    outside.dispose()
    with Session() as s:
        s.get(Other, 1).name = "renamed"  # type: ignore[union-attr]
        s.commit()
    reads.check("counter")


def test_unreadable_catalog_means_the_namespace() -> None:
    """A catalog that cannot be read (here: nothing listens on the port) never raises
    into the application: every write on that engine writes the whole namespace."""
    from ormcache.sqla.catalog import dependent_writes

    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=1")
    assert dependent_writes(engine, {"t:x", "a:x"}) == {"t:x", "a:x", "*"}
    engine.dispose()


@pytest.mark.parametrize("ddl", ["drop_create", "truncate", "alter"])
def test_ddl_through_an_attached_engine_invalidates(env: Any, db_engine: Any, ddl: str) -> None:
    """Issue 11, section 3: DDL invalidates the tables it touches."""
    from sqlalchemy import DDL

    cache, _Session, reads = env
    cache.attach(db_engine)
    reads.warm("other")
    with db_engine.begin() as conn:
        if ddl == "drop_create":
            Other.__table__.drop(conn)
            Other.__table__.create(conn)
            conn.execute(Other.__table__.insert().values(id=1, name="recreated"))
        elif ddl == "truncate":
            sqlite = kind(db_engine) == "sqlite"
            conn.execute(DDL("DELETE FROM dw_other" if sqlite else "TRUNCATE TABLE dw_other"))
        else:
            conn.execute(DDL("ALTER TABLE dw_other ADD COLUMN extra int"))
    reads.check("other")


@pytest.mark.parametrize(
    ("body", "dialect", "writes", "unknown"),
    [
        (
            "BEGIN IF TG_OP = 'DELETE' THEN INSERT INTO audit (id) VALUES (OLD.id);"
            " ELSE UPDATE stats SET n = n + 1 WHERE id = NEW.sid RETURNING n INTO v;"
            " END IF; RETURN NEW; END",
            "postgresql",
            {"audit", "stats"},
            False,
        ),
        ("BEGIN SELECT * FROM t FOR UPDATE; RETURN NEW; END", "postgresql", set(), False),
        ("BEGIN EXECUTE 'DELETE FROM ' || TG_TABLE_NAME; END", "postgresql", set(), True),
        ("BEGIN RAISE NOTICE 'update failed; delete nothing'; END", "postgresql", set(), False),
        (
            "BEGIN DELETE FROM public.logs WHERE ts < now(); END",
            "postgresql",
            {"public.logs"},
            False,
        ),
        ("BEGIN UPDATE a JOIN b ON a.id = b.id SET b.x = 1; END", "mysql", {"a", "b"}, False),
        ("BEGIN PREPARE s FROM @q; EXECUTE s; END", "mysql", set(), True),
        (" UPDATE c SET n = 1; DELETE FROM d; END", "sqlite", {"c", "d"}, False),
        ("BEGIN UPDATE t SET WHERE; END", "postgresql", set(), True),
        (None, "postgresql", set(), True),
    ],
)
def test_trigger_and_routine_bodies(
    body: str | None, dialect: str, writes: set[str], unknown: bool
) -> None:
    """Procedural bodies: each DML statement parsed on its own; dynamic SQL, or a
    statement that does not parse, means the writes are unknown."""
    from ormcache.sqla.reflection import scan_body

    found = scan_body(body, dialect)
    assert found.unknown is unknown
    if not unknown:
        assert {w.lower() for w in found.writes} >= writes
        bare = {w.split(".")[-1] for w in writes}
        assert {w.lower().split(".")[-1] for w in found.writes} == bare


def test_catalog_graph_follows_triggers_routines_and_views() -> None:
    """The graph built from catalog facts: transitive, by every name a tag may use, and
    the namespace where a trigger's writes are unknown."""
    from ormcache.sqla.catalog import Declarations, _closure, _Graph
    from ormcache.sqla.reflection import Body, CatalogFacts, Routine

    facts = CatalogFacts(
        default_schemas=frozenset({"public"}),
        actions={"public.parent": frozenset({"public.child"})},
        triggers={
            "public.child": (Body(calls=frozenset({"touch"})),),
            "public.opaque": (Body(unknown=True),),
        },
        views={"public.v_totals": frozenset({"public.totals"})},
        routines={
            "touch": Routine("v", Body(writes=frozenset({"totals"}))),
            "public.touch": Routine("v", Body(writes=frozenset({"totals"}))),
            "pure": Routine("i", Body()),
        },
    )
    graph = _Graph(facts, failed=False)
    extra, namespace = _closure({"parent"}, graph, None)
    assert not namespace
    assert {"child", "public.child", "totals", "v_totals", "public.v_totals"} <= extra
    assert _closure({"public.opaque"}, graph, None)[1]
    assert _closure({"v_totals"}, graph, None)[0] >= {"totals"}  # write through a view
    assert graph.rules.writes["touch"] >= {"totals"}
    assert "pure" in graph.rules.deterministic
    declared = Declarations()
    declared.declare("totals", ["ledger"])
    assert "ledger" in _closure({"parent"}, graph, declared)[0]
