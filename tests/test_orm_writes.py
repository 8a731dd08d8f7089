"""Writes the ORM sends without a statement of the application's naming them are seen
(README "Guarantees and their limits", 3; issue 11, section 2).

Many-to-many association rows written for a new or a deleted parent, the bulk APIs and
driver SQL on ``session.connection()`` all cross the cursor events of the engine the
attached sessionmaker binds to. Each test warms a memoized read and a FromCache read,
writes, and checks both against a fresh read on an engine the cache does not watch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, Table, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from ormcache import Cache, FromCache


class Base(DeclarativeBase):
    pass


class Post(Base):
    __tablename__ = "ow_posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    tags: Mapped[list[Tag]] = relationship(secondary="ow_post_tags", back_populates="posts")


class Tag(Base):
    __tablename__ = "ow_tags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    posts: Mapped[list[Post]] = relationship(secondary="ow_post_tags", back_populates="tags")


post_tags = Table(
    "ow_post_tags",  # the association rows under test
    Base.metadata,
    Column("post_id", ForeignKey("ow_posts.id"), primary_key=True),
    Column("tag_id", ForeignKey("ow_tags.id"), primary_key=True),
)


@pytest.fixture
def env(cache: Cache, db_engine: Any) -> Iterator[tuple[Cache, Any, Any]]:
    """The cache attached to a sessionmaker only (not to its Engine), seeded data, and an
    oracle: an engine on the same database that the cache does not watch."""
    Base.metadata.drop_all(db_engine)
    Base.metadata.create_all(db_engine)
    Session = sessionmaker(db_engine, expire_on_commit=False)
    cache.attach(Session)
    with Session() as s:
        tags = [Tag(id=i, name=f"tag{i}") for i in range(1, 4)]
        s.add_all([Post(id=1, title="one", tags=tags[:2]), Post(id=2, title="two", tags=tags)])
        s.commit()
    oracle = create_engine(db_engine.url)
    yield cache, Session, oracle
    oracle.dispose()
    Base.metadata.drop_all(db_engine)


def readers(cache: Cache, Session: Any) -> dict[str, Callable[[int], Any]]:
    """Reads of the association table and of tags, memoized and through FromCache."""

    @cache.memoize(ttl=60)
    def memo_tags_of(post_id: int) -> list[str]:
        with Session() as s:
            stmt = (
                select(Tag.name)
                .join(post_tags, post_tags.c.tag_id == Tag.id)
                .where(post_tags.c.post_id == post_id)
                .order_by(Tag.name)
            )
            return list(s.scalars(stmt))

    def fc_tags_of(post_id: int) -> list[str]:
        with Session() as s:
            stmt = (
                select(Tag.name, post_tags.c.tag_id)
                .join(post_tags, post_tags.c.tag_id == Tag.id)
                .where(post_tags.c.post_id == post_id)
                .order_by(Tag.name)
                .options(FromCache())
            )
            return [row.name for row in s.execute(stmt)]

    @cache.memoize(ttl=60)
    def memo_tag(tag_id: int) -> str | None:
        with Session() as s:
            return s.scalars(select(Tag.name).where(Tag.id == tag_id)).one_or_none()

    def fc_tag(tag_id: int) -> str | None:
        with Session() as s:
            tag = s.scalars(select(Tag).where(Tag.id == tag_id).options(FromCache())).one_or_none()
            return None if tag is None else tag.name

    return {
        "memo_tags": memo_tags_of,
        "fc_tags": fc_tags_of,
        "memo_tag": memo_tag,
        "fc_tag": fc_tag,
    }


def oracle_tags_of(oracle: Any, post_id: int) -> list[str]:
    with oracle.connect() as conn:
        rows = conn.execute(
            select(Tag.name)
            .join(post_tags, post_tags.c.tag_id == Tag.id)
            .where(post_tags.c.post_id == post_id)
            .order_by(Tag.name)
        )
        return [r[0] for r in rows]


def oracle_tag(oracle: Any, tag_id: int) -> str | None:
    with oracle.connect() as conn:
        return conn.execute(select(Tag.name).where(Tag.id == tag_id)).scalar_one_or_none()


def warm(fns: dict[str, Callable[[int], Any]], names: list[str], arg: int) -> None:
    for name in names:
        first = fns[name](arg)
        assert fns[name](arg) == first


def test_association_rows_of_a_new_parent_are_seen(env: Any) -> None:
    """Regression (issue 11): adding a *new* parent with its collection inserts the
    association rows in the same flush; reads of the association table stayed stale."""
    cache, Session, oracle = env
    fns = readers(cache, Session)
    warm(fns, ["memo_tags", "fc_tags"], 7)
    assert fns["memo_tags"](7) == []
    with Session() as s:
        s.add(Post(id=7, title="seven", tags=[s.get(Tag, 1), s.get(Tag, 3)]))
        s.commit()
    assert oracle_tags_of(oracle, 7) == ["tag1", "tag3"]
    assert fns["memo_tags"](7) == ["tag1", "tag3"]
    assert fns["fc_tags"](7) == ["tag1", "tag3"]


def test_association_rows_of_a_new_parent_and_new_children_are_seen(env: Any) -> None:
    """The same with both sides new: the rows are written after both inserts."""
    cache, Session, oracle = env
    fns = readers(cache, Session)
    warm(fns, ["memo_tags", "fc_tags"], 8)
    with Session() as s:
        s.add(Post(id=8, title="eight", tags=[Tag(id=9, name="tag9")]))
        s.commit()
    assert fns["memo_tags"](8) == oracle_tags_of(oracle, 8) == ["tag9"]
    assert fns["fc_tags"](8) == ["tag9"]


def test_association_rows_of_a_deleted_parent_are_seen(env: Any) -> None:
    """Regression (issue 11): deleting a parent deletes its association rows."""
    cache, Session, oracle = env
    fns = readers(cache, Session)
    warm(fns, ["memo_tags", "fc_tags"], 2)
    assert fns["memo_tags"](2) == ["tag1", "tag2", "tag3"]
    with Session() as s:
        s.delete(s.get(Post, 2))
        s.commit()
    assert oracle_tags_of(oracle, 2) == []
    assert fns["memo_tags"](2) == []
    assert fns["fc_tags"](2) == []


def test_association_rows_of_a_deleted_child_are_seen(env: Any) -> None:
    """Deleting the other side (a tag) removes its rows from every post's collection."""
    cache, Session, oracle = env
    fns = readers(cache, Session)
    warm(fns, ["memo_tags", "fc_tags"], 1)
    with Session() as s:
        s.delete(s.get(Tag, 1))
        s.commit()
    assert fns["memo_tags"](1) == oracle_tags_of(oracle, 1) == ["tag2"]
    assert fns["fc_tags"](1) == ["tag2"]


@pytest.mark.parametrize(
    "bulk", ["insert_mappings", "update_mappings", "save_objects_new", "save_objects_dirty"]
)
def test_bulk_apis_are_seen_with_only_the_sessionmaker_attached(env: Any, bulk: str) -> None:
    """Regression (issue 11): ``bulk_*`` bypass the flush events; their statements are
    seen at the cursor level of the sessionmaker's engine."""
    cache, Session, oracle = env
    fns = readers(cache, Session)
    target = 1 if "update" in bulk or "dirty" in bulk else 5
    warm(fns, ["memo_tag", "fc_tag"], target)
    with Session() as s:
        if bulk == "insert_mappings":
            s.bulk_insert_mappings(Tag, [{"id": 5, "name": "bulk5"}, {"id": 6, "name": "bulk6"}])
        elif bulk == "update_mappings":
            s.bulk_update_mappings(Tag, [{"id": 1, "name": "bulk1"}])
        elif bulk == "save_objects_new":
            s.bulk_save_objects([Tag(id=5, name="bulk5")])
        else:
            tag = s.get(Tag, 1)
            assert tag is not None
            tag.name = "bulk1"
            s.bulk_save_objects([tag])
        s.commit()
    expected = oracle_tag(oracle, target)
    assert str(expected).startswith("bulk")
    assert fns["memo_tag"](target) == expected
    assert fns["fc_tag"](target) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE ow_tags SET name = 'driver' WHERE id = 2",
        "update OW_TAGS set name = 'driver' where id = 2",
        "DELETE FROM ow_post_tags WHERE tag_id = 2",
    ],
)
def test_driver_sql_on_the_session_connection_is_seen(env: Any, sql: str) -> None:
    """Regression (issue 11): ``session.connection().exec_driver_sql(...)`` with only the
    sessionmaker attached was unseen."""
    cache, Session, oracle = env
    if "OW_TAGS" in sql and oracle.dialect.name in ("mysql", "mariadb"):
        pytest.skip("MariaDB table names are case-sensitive on Linux")
    fns = readers(cache, Session)
    warm(fns, ["memo_tag", "fc_tag"], 2)
    warm(fns, ["memo_tags", "fc_tags"], 1)
    with Session() as s:
        s.connection().exec_driver_sql(sql)
        s.commit()
    assert fns["memo_tag"](2) == oracle_tag(oracle, 2)
    assert fns["fc_tag"](2) == oracle_tag(oracle, 2)
    assert fns["memo_tags"](1) == oracle_tags_of(oracle, 1)
    assert fns["fc_tags"](1) == oracle_tags_of(oracle, 1)
