"""Reads that SQLAlchemy issues while a session flushes (issue 10, section 5).

Found by running ihatemoney's own test suite with ormcache integrated
(``examples/realapp``): deleting a bill loaded with ``FromCache`` lazy-loads its
many-to-many ``owers`` inside the flush, the lazy load inherits ``FromCache``
(``propagate_to_loaders``), and the cached read then called ``session.flush()`` from inside
the flush: ``InvalidRequestError: Session is already flushing``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Column, ForeignKey, String, Table, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from ormcache import Cache, FromCache


class Base(DeclarativeBase):
    pass


shares = Table(
    "fr_shares",
    Base.metadata,
    Column("bill_id", ForeignKey("fr_bills.id"), primary_key=True),
    Column("person_id", ForeignKey("fr_people.id"), primary_key=True),
)


class Person(Base):
    __tablename__ = "fr_people"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Bill(Base):
    __tablename__ = "fr_bills"
    id: Mapped[int] = mapped_column(primary_key=True)
    what: Mapped[str] = mapped_column(String(40))
    owers: Mapped[list[Person]] = relationship(secondary=shares)


@pytest.fixture
def session_factory(tmp_path: object, cache: Cache) -> Iterator[sessionmaker]:  # type: ignore[type-arg]
    engine = create_engine(f"sqlite:///{tmp_path}/flush.db")  # type: ignore[str-bytes-safe]
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    cache.attach(factory)
    with factory() as s:
        ann, bob = Person(name="ann"), Person(name="bob")
        s.add_all([Bill(id=1, what="dinner", owers=[ann, bob]), Bill(id=2, what="taxi")])
        s.commit()
    yield factory
    cache.detach(factory)
    engine.dispose()


@pytest.mark.parametrize("warm", [False, True], ids=["miss", "hit"])
def test_delete_of_a_cached_instance_lazy_loads_inside_the_flush(
    session_factory: sessionmaker,  # type: ignore[type-arg]
    warm: bool,
) -> None:
    """Deleting an instance that ``FromCache`` returned flushes once: the many-to-many
    collection its flush lazy-loads is read without a second flush, and the delete
    commits (the bill and its association rows are gone)."""
    stmt = select(Bill).where(Bill.id == 1).options(FromCache(ttl=60))
    if warm:
        with session_factory() as s:
            s.scalars(stmt).one()
    with session_factory() as s:
        bill = s.scalars(stmt).one()
        s.delete(bill)
        s.commit()
    with session_factory() as s:
        assert s.get(Bill, 1) is None
        assert s.execute(select(shares)).all() == []
        # and a cached read after the commit does not serve the deleted bill
        assert s.scalars(stmt).one_or_none() is None


def test_a_cached_read_inside_a_flush_stores_nothing_uncommitted(
    session_factory: sessionmaker,  # type: ignore[type-arg]
) -> None:
    """A FromCache read made by a mapper hook while the flush runs sees rows that flush
    wrote; it is neither stored nor served, so a rollback leaves nothing uncommitted in
    the cache and the next read sees the database."""
    from sqlalchemy import event, func
    from sqlalchemy.orm import object_session

    count = select(func.count()).select_from(Person).options(FromCache(ttl=60))
    seen: list[int] = []

    def after_insert(mapper: object, connection: object, target: Person) -> None:
        session = object_session(target)
        assert session is not None
        seen.append(session.scalars(count).one())

    event.listen(Person, "after_insert", after_insert)
    try:
        with session_factory() as s:
            s.add(Bill(id=3, what="hotel", owers=[Person(name="cy")]))
            s.flush()
            s.rollback()
    finally:
        event.remove(Person, "after_insert", after_insert)
    assert seen == [3]  # the hook saw the uncommitted person
    with session_factory() as s:
        assert s.scalars(count).one() == 2
