"""FromCache against the database oracle: a hit returns what the query returns, with no SQL.

Runs on SQLite, PostgreSQL and MariaDB, with the memory and Redis backends: entities,
joins, eager loads, single and joined inheritance, composite primary keys, every standard
column type, scalar and Row results, ``session.get`` and the legacy ``Query``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Uuid,
    bindparam,
    create_engine,
    inspect,
    select,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from ormcache import Cache, FromCache
from tests.support.sql import SQLCounter
from tests.support.threads import run_threads


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class Base(DeclarativeBase):
    pass


class Owner(Base):
    __tablename__ = "or_owners"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), index=True)
    email: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    born: Mapped[dt.date | None]
    balance: Mapped[decimal.Decimal] = mapped_column(Numeric(14, 4))
    ratio: Mapped[float]
    active: Mapped[bool]
    ident: Mapped[uuid.UUID] = mapped_column(Uuid)
    mood: Mapped[Mood] = mapped_column(SAEnum(Mood))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    period: Mapped[dt.timedelta] = mapped_column(Interval)
    pets: Mapped[list[Pet]] = relationship(back_populates="owner", order_by="Pet.id")


class Pet(Base):
    __tablename__ = "or_pets"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("or_owners.id"), index=True)
    name: Mapped[str] = mapped_column(String(50))
    owner: Mapped[Owner] = relationship(back_populates="pets")


class Staff(Base):
    __tablename__ = "or_staff"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "staff"}


class Boss(Staff):
    """Single-table inheritance."""

    floor: Mapped[int | None] = mapped_column(nullable=True)
    __mapper_args__ = {"polymorphic_identity": "boss"}


class Dev(Staff):
    """Joined-table inheritance."""

    __tablename__ = "or_devs"
    id: Mapped[int] = mapped_column(ForeignKey("or_staff.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "dev"}


class Slot(Base):
    """Composite primary key."""

    __tablename__ = "or_slots"

    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    hour: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(20))
    bookings: Mapped[list[Booking]] = relationship(order_by="Booking.id")


class Booking(Base):
    __tablename__ = "or_bookings"

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[str] = mapped_column(String(10))
    hour: Mapped[int]
    who: Mapped[str] = mapped_column(String(20))
    __table_args__ = (ForeignKeyConstraint(["day", "hour"], ["or_slots.day", "or_slots.hour"]),)


def shape(value: Any, depth: int = 0) -> Any:
    """A comparable picture of a result: loaded attributes and relationships, recursively."""
    if isinstance(value, (list, tuple)) or hasattr(value, "_fields"):
        return [shape(v, depth) for v in value]
    state = inspect(value, raiseerr=False)
    if state is None or not hasattr(state, "mapper"):
        return value
    cols = {p.key: state.dict[p.key] for p in state.mapper.column_attrs if p.key in state.dict}
    rels: dict[str, Any] = {}
    if depth < 2:
        for rel in state.mapper.relationships:
            if rel.key in state.dict:
                rels[rel.key] = shape(state.dict[rel.key], depth + 1)
    return (type(value).__name__, state.key[1] if state.key else None, cols, rels)


@pytest.fixture
def oracle(db_engine: Any, cache_url: str, namespace: str) -> Iterator[Any]:
    Base.metadata.drop_all(db_engine)
    Base.metadata.create_all(db_engine)
    Session = sessionmaker(db_engine, expire_on_commit=False)
    with Session() as s:
        for i in range(1, 4):
            s.add(
                Owner(
                    id=i,
                    name=f"owner{i % 2}",
                    email=f"o{i}@example.com",
                    created_at=dt.datetime(2024, 5, i, 12, 30, 15, 123456, tzinfo=dt.timezone.utc),
                    born=dt.date(1990, 1, i) if i != 2 else None,
                    balance=decimal.Decimal("1234.5678") * i,
                    ratio=0.25 * i,
                    active=i % 2 == 1,
                    ident=uuid.UUID(int=i),
                    mood=Mood.HAPPY if i % 2 else Mood.SAD,
                    data={"tags": ["a", "b"], "n": i, "nested": {"x": None}},
                    blob=bytes([i, 0, 255]),
                    period=dt.timedelta(days=i, seconds=30),
                    pets=[Pet(id=i * 10 + j, name=f"pet{i}{j}") for j in range(2)],
                )
            )
        s.add_all(
            [
                Boss(id=1, name="b", floor=7),
                Dev(id=2, name="d", language="py"),
                Staff(id=3, name="s"),
                Slot(day="mon", hour=9, label="x", bookings=[Booking(id=1, who="a")]),
                Slot(day="mon", hour=10, label="y"),
            ]
        )
        s.commit()
    cache = Cache(cache_url, namespace=namespace, strict=True, default_ttl=60)
    cache.attach(Session)
    counter = SQLCounter(db_engine)

    class Plain:
        cached = False

        def __call__(self, stmt: Any) -> Any:
            return stmt

    class Cached(Plain):
        cached = True

        def __call__(self, stmt: Any) -> Any:
            return stmt.options(FromCache())

    def check(build: Callable[[Any], Any]) -> Any:
        """Uncached, then a miss, then a hit: all equal, and the hit runs no SQL."""
        with Session() as s:
            expected = shape(build(Plain())(s))
        with Session() as s:
            miss = shape(build(Cached())(s))
        counter.reset()
        with Session() as s:
            hit_value = build(Cached())(s)
            hit = shape(hit_value)
            assert counter.count == 0, counter.statements
        assert miss == expected
        assert hit == expected
        return hit_value

    yield check, Session, cache
    cache.clear()
    cache.close()
    Base.metadata.drop_all(db_engine)


def test_entity_with_every_standard_type(oracle: Any) -> None:
    check, _, cache = oracle
    owner = check(lambda o: lambda s: s.scalars(o(select(Owner).where(Owner.id == 1))).one())
    assert type(owner.balance) is decimal.Decimal
    assert type(owner.ident) is uuid.UUID
    assert owner.mood is Mood.HAPPY
    assert cache.stats().hits == 1


def test_lists_joins_and_filters(oracle: Any) -> None:
    check, _, _ = oracle
    check(lambda o: lambda s: s.scalars(o(select(Owner).order_by(Owner.id))).all())
    check(
        lambda o: (
            lambda s: s.scalars(
                o(select(Owner).join(Pet).where(Pet.name == "pet11").order_by(Owner.id))
            ).all()
        )
    )
    check(lambda o: lambda s: s.scalars(o(select(Owner).where(Owner.name == "owner1"))).all())
    check(lambda o: lambda s: s.scalars(o(select(Owner).where(Owner.id.in_([1, 3])))).all())


def test_eager_loads(oracle: Any) -> None:
    check, _, _ = oracle
    hit = check(
        lambda o: (
            lambda s: s.scalars(
                o(select(Owner).options(selectinload(Owner.pets)).order_by(Owner.id))
            ).all()
        )
    )
    assert [p.name for p in hit[0].pets] == ["pet10", "pet11"]
    check(
        lambda o: (
            lambda s: (
                s.scalars(o(select(Owner).options(joinedload(Owner.pets)).order_by(Owner.id)))
                .unique()
                .all()
            )
        )
    )
    check(
        lambda o: (
            lambda s: s.scalars(
                o(select(Pet).options(joinedload(Pet.owner)).order_by(Pet.id))
            ).all()
        )
    )


def test_inheritance(oracle: Any) -> None:
    check, _, _ = oracle
    check(lambda o: lambda s: s.scalars(o(select(Staff).order_by(Staff.id))).all())
    check(lambda o: lambda s: s.scalars(o(select(Boss))).all())
    check(lambda o: lambda s: s.scalars(o(select(Dev).where(Dev.language == "py"))).all())


def test_composite_primary_keys(oracle: Any) -> None:
    check, _, _ = oracle
    check(
        lambda o: (
            lambda s: s.scalars(
                o(select(Slot).options(selectinload(Slot.bookings)).order_by(Slot.hour))
            ).all()
        )
    )
    check(
        lambda o: (
            lambda s: s.scalars(o(select(Slot).where(Slot.day == "mon", Slot.hour == 9))).one()
        )
    )


def test_columns_rows_and_scalars(oracle: Any) -> None:
    check, _, _ = oracle
    rows = check(
        lambda o: (
            lambda s: s.execute(
                o(select(Owner.id, Owner.name, Owner.balance, Owner.created_at).order_by(Owner.id))
            ).all()
        )
    )
    assert rows[0]._fields == ("id", "name", "balance", "created_at")
    check(lambda o: lambda s: s.scalars(o(select(Owner.email).order_by(Owner.id))).all())
    check(lambda o: lambda s: s.execute(o(select(Owner, Pet).join(Pet).order_by(Pet.id))).all())


def test_session_get_and_legacy_query(oracle: Any) -> None:
    check, _, _ = oracle
    check(lambda o: lambda s: s.get(Owner, 2, options=[FromCache()] if o.cached else []))
    check(
        lambda o: (
            lambda s: (
                (s.query(Owner).options(FromCache()) if o.cached else s.query(Owner))
                .order_by(Owner.id)
                .all()
            )
        )
    )


def test_identity_map_semantics_on_a_hit(oracle: Any) -> None:
    """An instance already in the session keeps its state (and pending changes), as with
    a database load; new identities become persistent and clean."""
    _, Session, _ = oracle
    stmt = select(Owner).where(Owner.id == 1).options(FromCache())
    with Session() as s:
        s.scalars(stmt).one()  # warm the cache
    with Session() as s:
        owner = s.get(Owner, 1)
        assert owner is not None
        with s.no_autoflush:
            owner.name = "changed, not flushed"
            hit = s.scalars(select(Owner).where(Owner.id == 3).options(FromCache())).one()
        assert inspect(hit).persistent
        assert not inspect(hit).modified
        assert s.scalars(stmt).one() is owner
        assert owner.name == "changed, not flushed"


def test_prebuilt_statement_reused_across_sessions(oracle: Any) -> None:
    """A statement built once (a module-level constant) keeps its derived key between
    runs: hits stay exact and SQL-free, a commit still invalidates it, its own session's
    pending writes still bypass it, and per-call parameters still select other rows."""
    _, Session, cache = oracle
    by_id = select(Owner).where(Owner.id == 1).options(FromCache())
    by_param = select(Owner).where(Owner.id == bindparam("oid")).options(FromCache())
    with Session() as s:
        assert s.scalars(by_id).one().name == "owner1"
    for _ in range(3):
        with Session() as s:
            before = cache.stats().hits
            assert s.scalars(by_id).one().name == "owner1"
            assert cache.stats().hits == before + 1
    with Session() as s:
        s.get(Owner, 1).name = "renamed"  # type: ignore[union-attr]
        # Read-your-writes inside the transaction, through the remembered key.
        assert s.scalars(by_id).one().name == "renamed"
        s.commit()
    with Session() as s:
        assert s.scalars(by_id).one().name == "renamed"
    for oid in (1, 2, 3, 2, 1):
        with Session() as s:
            assert s.scalars(by_param, {"oid": oid}).one().id == oid


def test_recycled_statement_ids_never_share_a_key(oracle: Any) -> None:
    """Statements built and dropped in a loop often reuse the same id(): each must still
    get its own key (the remembered key is checked against a weak reference)."""
    _, Session, _ = oracle
    with Session() as s:
        for _ in range(3):
            for oid in (1, 2, 3):
                stmt = select(Owner).where(Owner.id == oid).options(FromCache())
                assert s.scalars(stmt).one().id == oid
                del stmt


def test_threads_with_built_and_shared_statements(oracle: Any) -> None:
    """Threads run built-per-call and shared prebuilt statements for different rows
    while the remembered statement keys are dropped under them: every result is the
    row its statement asks for."""
    import random

    from ormcache.sqla import fromcache

    _, Session, cache = oracle
    shared = {oid: select(Owner).where(Owner.id == oid).options(FromCache()) for oid in (1, 2, 3)}

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(150):
            oid = rng.choice((1, 2, 3))
            with Session() as s:
                if rng.random() < 0.5:
                    stmt = shared[oid]
                else:
                    stmt = select(Owner).where(Owner.id == oid).options(FromCache())
                owner = s.scalars(stmt).one()
                assert (owner.id, owner.email) == (oid, f"o{oid}@example.com")
            if seed == 0 and i % 25 == 0:
                fromcache._stmt_keys.clear()

    run_threads(work, 4)
    assert cache.stats().hits > 0


def test_two_databases_behind_one_cache_never_share_entries(
    tmp_path: Any, cache_url: str, namespace: str
) -> None:
    """The same statement against two databases (shards, a database per tenant) through
    one cache: each session gets its own database's row, on the miss and on the hit."""
    cache = Cache(cache_url, namespace=namespace, strict=True)
    factories = []
    for name in ("left", "right"):
        engine = create_engine(f"sqlite:///{tmp_path / name}.sqlite")
        Base.metadata.create_all(engine)
        factory = sessionmaker(engine, expire_on_commit=False)
        with factory() as s:
            s.add(Staff(id=1, name=name))
            s.commit()
        cache.attach(factory)
        factories.append((name, factory, engine))
    shared = select(Staff).where(Staff.id == 1).options(FromCache())
    try:
        for _ in range(3):
            for name, factory, _engine in factories:
                with factory() as s:
                    assert s.scalars(shared).one().name == name
                    built = select(Staff).where(Staff.id == 1).options(FromCache())
                    assert s.scalars(built).one().name == name
        assert cache.stats().hits >= 8
    finally:
        cache.clear()
        cache.close()
        for _, _, engine in factories:
            engine.dispose()


def test_postgresql_array(postgres_url: str, namespace: str) -> None:
    """ARRAY round-trips through a hit (PostgreSQL only)."""

    class ArrBase(DeclarativeBase):
        pass

    class Doc(ArrBase):
        __tablename__ = "or_docs"
        id: Mapped[int] = mapped_column(primary_key=True)
        tags: Mapped[list[str]] = mapped_column(postgresql.ARRAY(String(20)))

    engine = create_engine(postgres_url)
    ArrBase.metadata.drop_all(engine)
    ArrBase.metadata.create_all(engine)
    Session = sessionmaker(engine)
    with Session() as s:
        s.add(Doc(id=1, tags=["a", "b"]))
        s.commit()
    cache = Cache(namespace=namespace, strict=True)
    cache.attach(Session)
    stmt = select(Doc).where(Doc.id == 1).options(FromCache())
    with Session() as s:
        assert s.scalars(stmt).one().tags == ["a", "b"]
    with Session() as s:
        assert s.scalars(stmt).one().tags == ["a", "b"]
    assert cache.stats().hits == 1, cache.stats()
    ArrBase.metadata.drop_all(engine)
    engine.dispose()
