"""Statement analysis, one statement at a time: which tags a statement reads or writes.

No Cache, no database: these call ``ormcache.sqla.analysis`` directly, the way
django-cacheops tests its query-to-conditions function. Each expected set is exact, so a
tag that goes missing (a stale read) and a tag that appears from nowhere both fail.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    Sequence,
    String,
    Table,
    and_,
    between,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    union,
    union_all,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    aliased,
    column_property,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
)
from sqlalchemy.sql import functions as sa_functions

from ormcache.protocol import NAMESPACE_TAG
from ormcache.sqla.analysis import (
    FunctionRules,
    dml_write_tags,
    select_write_tags,
    statement_read_tags,
    text_is_read,
    text_read_tags,
    text_write_tags,
    uncacheable_reason,
)
from ormcache.sqla.tags import partition_tag


class Base(DeclarativeBase):
    pass


user_groups = Table(
    "user_groups",
    Base.metadata,
    Column("user_id", ForeignKey("users.id"), primary_key=True),
    Column("group_id", ForeignKey("groups.id"), primary_key=True),
)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str] = mapped_column(String(100), unique=True)
    addresses: Mapped[list[Address]] = relationship(back_populates="user")
    groups: Mapped[list[Group]] = relationship(secondary=user_groups)


class Address(Base):
    __tablename__ = "addresses"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    city: Mapped[str] = mapped_column(String(50))
    user: Mapped[User] = relationship(back_populates="addresses")


class Group(Base):
    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))


class Node(Base):
    """Self-referential: a parent and its children live in one table."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"))
    label: Mapped[str] = mapped_column(String(50))
    children: Mapped[list[Node]] = relationship()


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)


class Order(Base):
    """Loads its items with selectin, and counts them with a column_property subquery."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    items: Mapped[list[Item]] = relationship(lazy="selectin")
    item_count: Mapped[int] = column_property(
        select(func.count(Item.id))
        .where(Item.order_id == id)
        .correlate_except(Item)
        .scalar_subquery()
    )


class Employee(Base):
    __tablename__ = "employees"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "managers"

    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    budget: Mapped[int] = mapped_column(Integer)
    __mapper_args__ = {"polymorphic_identity": "manager"}


audit_log = Table(
    "log",
    Base.metadata,
    Column("id", Integer, primary_key=True),
    Column("message", String(200)),
    schema="audit",
)

users = User.__table__
addresses = Address.__table__
nodes = Node.__table__


def t(*names: str) -> set[str]:
    """Whole-table read tags."""
    return {f"t:{n}" for n in names}


def w(*names: str) -> set[str]:
    """What a write to these tables bumps: the table, and "some partition of it"."""
    return {tag for n in names for tag in (f"t:{n}", f"a:{n}")}


def p(table: Any, column: str, value: object) -> set[str]:
    """A partition read: the partition itself, plus the table's any-partition tag."""
    tag = partition_tag(table, table.c[column], value)
    assert tag is not None
    return {tag, f"a:{table.fullname}"}


def reads(stmt: Any, params: dict[str, Any] | None = None, dialect: str = "postgresql") -> Any:
    return statement_read_tags(stmt, params, None, dialect)


# --- SELECT: single tables and partitions ------------------------------------------


def test_primary_key_lookup_reads_one_partition() -> None:
    assert reads(select(User).where(User.id == 5)) == p(users, "id", 5)


def test_primary_key_lookup_either_side_of_the_operator() -> None:
    assert reads(select(User).where(5 == User.id))  # noqa: SIM300 == p(users, "id", 5)


def test_unique_column_lookup_reads_its_partition() -> None:
    assert reads(select(User).where(User.email == "a@b.c")) == p(users, "email", "a@b.c")


def test_indexed_foreign_key_lookup_reads_its_partition() -> None:
    assert reads(select(Address).where(Address.user_id == 3)) == p(addresses, "user_id", 3)


def test_partition_value_comes_from_the_execution_params() -> None:
    from sqlalchemy import bindparam

    stmt = select(User).where(User.id == bindparam("uid"))
    assert reads(stmt, {"uid": 7}) == p(users, "id", 7)


def test_unindexed_column_lookup_reads_the_table() -> None:
    assert reads(select(User).where(User.name == "x")) == t("users")


def test_no_where_reads_the_table() -> None:
    assert reads(select(User)) == t("users")


def test_or_of_equalities_reads_the_table() -> None:
    assert reads(select(User).where((User.id == 1) | (User.id == 2))) == t("users")


def test_and_with_other_terms_keeps_the_partition() -> None:
    stmt = select(User).where(User.id == 1, User.name.like("a%"))
    assert reads(stmt) == p(users, "id", 1)


def test_in_list_reads_the_table() -> None:
    assert reads(select(User).where(User.id.in_([1, 2]))) == t("users")


def test_inequality_reads_the_table() -> None:
    assert reads(select(User).where(User.id > 1)) == t("users")


def test_column_select_and_aggregate() -> None:
    stmt = select(User.name, func.count()).group_by(User.name).having(func.count() > 1)
    assert reads(stmt) == t("users")


def test_float_value_has_no_exact_partition() -> None:
    assert reads(select(User).where(User.id == 1.5)) == t("users")


def test_mysql_case_insensitive_collation_reads_the_table() -> None:
    stmt = select(User).where(User.email == "A@b.c")
    assert reads(stmt, dialect="mysql") == t("users")
    assert reads(stmt, dialect="postgresql") == p(users, "email", "A@b.c")


def test_schema_qualified_table() -> None:
    assert reads(select(audit_log).where(audit_log.c.id == 1)) == p(audit_log, "id", 1)
    assert reads(select(audit_log)) == t("audit.log")


# --- SELECT: joins ------------------------------------------------------------------


def test_inner_join_reads_both_tables() -> None:
    assert reads(select(User).join(User.addresses)) == t("users", "addresses")


def test_outer_join_reads_both_tables() -> None:
    stmt = select(User, Address).outerjoin(Address, Address.user_id == User.id)
    assert reads(stmt) == t("users", "addresses")


def test_join_with_partition_on_the_primary_table() -> None:
    stmt = select(User).join(User.addresses).where(User.id == 1)
    assert reads(stmt) == p(users, "id", 1) | t("addresses")


def test_many_to_many_join_reads_the_association_table() -> None:
    stmt = select(User).join(User.groups)
    assert reads(stmt) == t("users", "user_groups", "groups")


def test_core_join_of_tables() -> None:
    stmt = select(users.c.name, addresses.c.city).select_from(users.join(addresses))
    assert reads(stmt) == t("users", "addresses")


def test_comma_join_reads_both_tables() -> None:
    stmt = select(User.name, Address.city).where(Address.user_id == User.id)
    assert reads(stmt) == t("users", "addresses")


def test_self_join_through_aliased_reads_the_whole_table() -> None:
    """A partition on one alias says nothing of the rows the other alias reads."""
    parent = aliased(Node)
    stmt = select(Node).join(parent, Node.parent_id == parent.id).where(Node.id == 1)
    assert reads(stmt) == t("nodes")


def test_self_join_aliased_partition_on_the_alias_reads_the_whole_table() -> None:
    parent = aliased(Node)
    stmt = select(Node).join(parent, Node.parent_id == parent.id).where(parent.id == 1)
    assert reads(stmt) == t("nodes")


def test_joined_inheritance_reads_both_tables() -> None:
    assert reads(select(Manager)) == t("employees", "managers")


def test_joined_inheritance_partition() -> None:
    # Manager.id is managers.id: the base table is read by the join, all of it.
    got = reads(select(Manager).where(Manager.id == 4))
    assert got == p(Manager.__table__, "id", 4) | t("employees")


# --- SELECT: eager loads --------------------------------------------------------------


def test_joinedload_reads_the_related_table() -> None:
    stmt = select(User).options(joinedload(User.addresses)).where(User.id == 1)
    assert reads(stmt) == p(users, "id", 1) | t("addresses")


def test_selectinload_reads_the_related_table() -> None:
    stmt = select(User).options(selectinload(User.addresses))
    assert reads(stmt) == t("users", "addresses")


def test_subqueryload_many_to_many_reads_the_association() -> None:
    stmt = select(User).options(subqueryload(User.groups))
    assert reads(stmt) == t("users", "user_groups", "groups")


def test_self_referential_eager_load_on_a_primary_key_reads_the_whole_table() -> None:
    """The children are other rows of the same table: a partition tag is too narrow."""
    stmt = select(Node).where(Node.id == 1).options(joinedload(Node.children))
    assert reads(stmt) == t("nodes")


def test_relationship_declared_selectin_is_read() -> None:
    assert reads(select(Order)) >= t("orders", "items")


def test_column_property_subquery_is_read() -> None:
    assert reads(select(Order).where(Order.id == 2)) == p(Order.__table__, "id", 2) | t("items")


# --- SELECT: subqueries, CTEs, unions -------------------------------------------------


def test_in_subquery_reads_both_tables() -> None:
    sub = select(Address.user_id).where(Address.city == "x")
    assert reads(select(User).where(User.id.in_(sub))) == t("users", "addresses")


def test_scalar_subquery_reads_both_tables() -> None:
    count = select(func.count(Address.id)).where(Address.user_id == User.id).scalar_subquery()
    assert reads(select(User.name, count)) == t("users", "addresses")


def test_exists_reads_both_tables() -> None:
    stmt = select(User).where(exists().where(Address.user_id == User.id))
    assert reads(stmt) == t("users", "addresses")


def test_correlated_subquery_with_partition_outside() -> None:
    has = select(Address.id).where(Address.user_id == User.id).exists()
    assert reads(select(User).where(User.id == 9, has)) == p(users, "id", 9) | t("addresses")


def test_same_table_subquery_reads_the_whole_table() -> None:
    """The subquery reads other rows of users: a partition on the outer query is too narrow."""
    sub = select(func.max(User.id)).scalar_subquery()
    assert reads(select(User).where(User.id == 1, User.name == sub)) == t("users")


def test_from_subquery() -> None:
    sub = select(Address.user_id, func.count().label("n")).group_by(Address.user_id).subquery()
    stmt = select(User.name, sub.c.n).join(sub, sub.c.user_id == User.id)
    assert reads(stmt) == t("users", "addresses")


def test_cte_reads_its_body() -> None:
    cte = select(Address.user_id).where(Address.city == "x").cte("c")
    stmt = select(User).join(cte, cte.c.user_id == User.id)
    assert reads(stmt) == t("users", "addresses")


def test_recursive_cte_reads_its_table() -> None:
    tree = select(Node.id).where(Node.parent_id.is_(None)).cte("tree", recursive=True)
    tree = tree.union_all(select(Node.id).join(tree, Node.parent_id == tree.c.id))
    assert reads(select(tree.c.id)) == t("nodes")


def test_union_reads_every_branch() -> None:
    stmt = union(select(User.name), select(Address.city))
    assert reads(stmt) in (None, t("users", "addresses"))


def test_union_all_as_subquery() -> None:
    sub = union_all(select(User.id), select(Address.user_id)).subquery()
    assert reads(select(sub.c.id)) == t("users", "addresses")


# --- DML --------------------------------------------------------------------------------


def test_core_insert_writes_the_table() -> None:
    assert dml_write_tags(insert(users).values(name="x")) == w("users")


def test_orm_insert_writes_the_table() -> None:
    assert dml_write_tags(insert(User)) == w("users")


def test_orm_update_writes_the_table() -> None:
    assert dml_write_tags(update(User).where(User.id == 1).values(name="x")) == w("users")


def test_core_update_with_returning() -> None:
    stmt = update(users).where(users.c.id == 1).values(name="x").returning(users.c.id)
    assert dml_write_tags(stmt) == w("users")


def test_orm_delete_writes_the_table() -> None:
    assert dml_write_tags(delete(User).where(User.name == "x")) == w("users")


def test_core_delete_with_returning() -> None:
    assert dml_write_tags(delete(addresses).returning(addresses.c.id)) == w("addresses")


def test_update_from_writes_only_the_target() -> None:
    stmt = (
        update(users)
        .where(users.c.id == addresses.c.user_id, addresses.c.city == "x")
        .values(name="y")
    )
    assert dml_write_tags(stmt) == w("users")


def test_joined_inheritance_update_writes_every_table_of_the_class() -> None:
    assert dml_write_tags(update(Manager).values(budget=1)) == w("employees", "managers")


def test_schema_qualified_delete() -> None:
    assert dml_write_tags(delete(audit_log)) == w("audit.log")


# --- text() -----------------------------------------------------------------------------


def test_text_select_is_a_read() -> None:
    assert text_is_read("SELECT * FROM users WHERE id = :id")
    assert reads(text("SELECT * FROM users WHERE id = :id")) == t("users")


def test_text_join_reads_both_tables() -> None:
    assert reads(text("SELECT * FROM users JOIN addresses ON 1 = 1")) == t("users", "addresses")


@pytest.mark.parametrize("kind", ["UPDATE users SET name = 'x'", "DELETE FROM users"])
def test_text_dml_is_a_write(kind: str) -> None:
    assert not text_is_read(kind)
    assert text_write_tags(kind) == w("users")


def test_text_insert_is_a_write() -> None:
    assert text_write_tags("INSERT INTO users (name) VALUES ('x')") == w("users")


def test_text_without_a_table_writes_the_namespace() -> None:
    assert text_write_tags("VACUUM") == {NAMESPACE_TAG}


def test_text_literal_column_is_fine_in_a_select() -> None:
    assert reads(select(literal_column("1"))) == set()


def test_text_comma_join_reads_both_tables() -> None:
    assert reads(text("SELECT * FROM users, addresses")) == t("users", "addresses")


def test_text_truncate_of_two_tables() -> None:
    assert text_write_tags("TRUNCATE users, addresses") == w("users", "addresses")


def test_text_with_update_is_a_write() -> None:
    assert not text_is_read("WITH x AS (SELECT 1) UPDATE users SET name = 'a'")


# --- raw SQL through sqlglot ----------------------------------------------------------

READS = [
    ("SELECT * FROM users", "postgresql", t("users")),
    (
        "SELECT * FROM users, addresses WHERE users.id = addresses.user_id",
        "postgresql",
        t("users", "addresses"),
    ),
    (
        "SELECT * FROM users u LEFT OUTER JOIN addresses a ON a.user_id = u.id",
        "mysql",
        t("users", "addresses"),
    ),
    ("SELECT * FROM USERS", "postgresql", t("users")),
    ('SELECT * FROM "Users"', "postgresql", t("Users")),
    ("SELECT * FROM ONLY users", "postgresql", t("users")),
    ("SELECT * FROM public.users", "postgresql", t("users", "public.users")),
    ('SELECT * FROM "public"."users"', "postgresql", t("users", "public.users")),
    ("SELECT * FROM audit.log", "postgresql", t("log", "audit.log")),
    ("SELECT * FROM `shop`.`users`", "mysql", t("users", "shop.users")),
    ("SELECT * FROM Users", "mysql", t("Users", "users")),
    ("SELECT * FROM Users", "sqlite", t("Users", "users")),
    (
        "SELECT * FROM users WHERE id IN (SELECT user_id FROM addresses)",
        "postgresql",
        t("users", "addresses"),
    ),
    (
        "SELECT (SELECT count(*) FROM addresses a WHERE a.user_id = u.id) FROM users u",
        "postgresql",
        t("users", "addresses"),
    ),
    (
        "SELECT * FROM users WHERE EXISTS (SELECT 1 FROM addresses)",
        "sqlite",
        t("users", "addresses"),
    ),
    (
        "WITH c AS (SELECT user_id FROM addresses)"
        " SELECT * FROM users JOIN c ON c.user_id = users.id",
        "postgresql",
        t("users", "addresses"),
    ),
    (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5)"
        " SELECT * FROM r JOIN nodes ON nodes.id = r.n",
        "postgresql",
        t("nodes"),
    ),
    ("SELECT name FROM users UNION SELECT city FROM addresses", "mysql", t("users", "addresses")),
    ("SELECT * FROM (SELECT * FROM users) AS s", "postgresql", t("users")),
    ("SELECT 1", "postgresql", set()),
    ("VALUES (1), (2)", "postgresql", set()),
    ("SELECT * FROM users WHERE id = %s", "mysql", t("users")),
    ("SELECT * FROM users WHERE id = %(id)s AND name LIKE 'a%%'", "mysql", t("users")),
    ("SELECT * FROM users WHERE id = ?", "sqlite", t("users")),
    ("SELECT * FROM users WHERE id = %(id)s", "postgresql", t("users")),
    ("SELECT count(*), lower(name), coalesce(name, '') FROM users GROUP BY 2", None, t("users")),
]


@pytest.mark.parametrize(("sql", "dialect", "expected"), READS)
def test_text_reads(sql: str, dialect: str | None, expected: set[str]) -> None:
    assert text_is_read(sql, dialect)
    assert text_read_tags(sql, dialect) == expected
    assert text_write_tags(sql, dialect) == set()
    assert reads(text(sql), dialect=dialect or "") == expected


WRITES = [
    ("INSERT INTO users (name) VALUES ('x')", "postgresql", w("users")),
    ("INSERT INTO users (name) SELECT city FROM addresses", "postgresql", w("users")),
    (
        "INSERT INTO users (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET name = 'x'",
        "postgresql",
        w("users"),
    ),
    (
        "INSERT IGNORE INTO users (id) VALUES (1)",
        "mysql",
        w("users"),
    ),
    ("REPLACE INTO users (id) VALUES (1)", "mysql", w("users")),
    ("INSERT OR REPLACE INTO users (id) VALUES (1)", "sqlite", w("users")),
    ("UPDATE users SET name = 'x'", "postgresql", w("users")),
    ("UPDATE ONLY users SET name = 'x'", "postgresql", w("users")),
    ("UPDATE USERS SET name = 'x'", "postgresql", w("users")),
    ('UPDATE "public"."users" SET name = \'x\'', "postgresql", w("users", "public.users")),
    ("UPDATE `shop`.`users` SET name = 'x'", "mysql", w("users", "shop.users")),
    (
        "UPDATE users SET name = a.city FROM addresses a WHERE a.user_id = users.id",
        "postgresql",
        w("users"),
    ),
    (
        "UPDATE users u JOIN addresses a ON a.user_id = u.id SET a.city = 'x'",
        "mysql",
        w("users", "addresses"),
    ),
    (
        "UPDATE users, addresses SET addresses.city = 'x' WHERE addresses.user_id = users.id",
        "mysql",
        w("users", "addresses"),
    ),
    ("WITH x AS (SELECT 1) UPDATE users SET name = 'a'", "postgresql", w("users")),
    (
        "WITH x AS (SELECT id FROM nodes)"
        " UPDATE users SET name = 'a' WHERE id IN (SELECT id FROM x)",
        "mysql",
        w("users"),
    ),
    ("DELETE FROM users WHERE id = 1", "postgresql", w("users")),
    (
        "DELETE FROM users USING addresses WHERE addresses.user_id = users.id",
        "postgresql",
        w("users"),
    ),
    (
        "DELETE u, a FROM users u JOIN addresses a ON a.user_id = u.id",
        "mysql",
        w("users", "addresses"),
    ),
    ("DELETE FROM users WHERE id IN (SELECT user_id FROM addresses)", "mysql", w("users")),
    ("TRUNCATE users, addresses", "postgresql", w("users", "addresses")),
    ("TRUNCATE TABLE users", "mysql", w("users")),
    ("TRUNCATE users CASCADE", "postgresql", {NAMESPACE_TAG}),
    (
        "MERGE INTO users USING staging s ON s.id = users.id"
        " WHEN MATCHED THEN UPDATE SET name = s.name",
        "postgresql",
        w("users"),
    ),
    (
        "WITH u AS (UPDATE users SET name = 'x' RETURNING id) SELECT * FROM u",
        "postgresql",
        w("users"),
    ),
    (
        "WITH d AS (DELETE FROM addresses RETURNING user_id)"
        " SELECT * FROM users WHERE id IN (SELECT user_id FROM d)",
        "postgresql",
        w("addresses"),
    ),
    ("SELECT * INTO archive FROM users", "postgresql", w("archive")),
    ("CREATE TABLE users (id int)", "postgresql", w("users")),
    ("CREATE TABLE audit.log (id int)", "postgresql", w("log", "audit.log")),
    ("ALTER TABLE users ADD COLUMN age int", "postgresql", w("users")),
    ("DROP TABLE users, addresses", "postgresql", w("users", "addresses")),
    ("CREATE INDEX ix_name ON users (name)", "postgresql", w("users")),
    ("UPDATE users SET name = %s WHERE id = %s", "mysql", w("users")),
]


@pytest.mark.parametrize(("sql", "dialect", "expected"), WRITES)
def test_text_writes(sql: str, dialect: str | None, expected: set[str]) -> None:
    if dialect != "postgresql":
        # Outside PostgreSQL an unquoted name may be case sensitive: both spellings.
        expected = expected | {tag for tag in expected if tag != tag.lower()}
    assert not text_is_read(sql, dialect)
    assert text_read_tags(sql, dialect) is None
    assert text_write_tags(sql, dialect) == expected


NAMESPACE_WRITES = [
    ("CALL refresh_totals()", "postgresql"),
    ("DO $$ BEGIN UPDATE users SET name = 'x'; END $$", "postgresql"),
    ("SET search_path TO tenant_1", "postgresql"),
    ("SELECT 1; DELETE FROM users", "postgresql"),
    ("SELECT refresh_totals()", "postgresql"),
    ("SELECT * FROM users WHERE app.touch(id)", "postgresql"),
    ("DROP INDEX ix_name", "postgresql"),
    ("CREATE FUNCTION f() RETURNS int AS 'SELECT 1' LANGUAGE sql", "postgresql"),
    ("VACUUM", "postgresql"),
    ("this is not sql", "postgresql"),
    ("", "postgresql"),
    ("SELECT id INTO @x FROM users", "mysql"),
    ("EXPLAIN ANALYZE DELETE FROM users", "postgresql"),
]


@pytest.mark.parametrize(("sql", "dialect"), NAMESPACE_WRITES)
def test_text_not_understood_writes_the_namespace(sql: str, dialect: str) -> None:
    """Unparsable or unknown SQL is never a read; it bumps everything."""
    assert not text_is_read(sql, dialect)
    assert text_read_tags(sql, dialect) is None
    assert NAMESPACE_TAG in text_write_tags(sql, dialect)
    assert reads(text(sql), dialect=dialect) is None


def test_declared_function_writes_replace_the_namespace() -> None:
    rules = FunctionRules(writes={"refresh_totals": frozenset({"totals"})})
    assert text_write_tags("SELECT refresh_totals()", "postgresql", rules) == w("totals")
    assert not text_is_read("SELECT refresh_totals()", "postgresql", rules)


def test_declared_read_only_and_deterministic_functions_are_reads() -> None:
    for rules in (
        FunctionRules(read_only=frozenset({"price_of"})),
        FunctionRules(deterministic=frozenset({"price_of"})),
    ):
        assert text_is_read("SELECT price_of(id) FROM items", "postgresql", rules)
        assert text_read_tags("SELECT price_of(id) FROM items", "postgresql", rules) == t("items")


def test_volatile_builtins_read_but_do_not_write() -> None:
    sql = "SELECT random(), now(), current_user, nextval('s') FROM users"
    assert text_is_read(sql, "postgresql")
    assert text_read_tags(sql, "postgresql") == t("users")


def test_core_update_of_a_table_with_orm_criteria() -> None:
    """A Core UPDATE of a Table filtered by ORM attributes used to raise KeyError."""
    stmt = update(users).where(User.id == Address.user_id).values(name="x")
    assert dml_write_tags(stmt) == w("users")


def test_multi_table_update_writes_every_table_it_sets() -> None:
    """MySQL/MariaDB ``UPDATE users, addresses SET addresses.city = …``."""
    stmt = (
        update(users)
        .values({users.c.name: "n", addresses.c.city: "c"})
        .where(users.c.id == addresses.c.user_id)
    )
    assert dml_write_tags(stmt) == w("users", "addresses")


def test_insert_from_a_deleting_cte_writes_both_tables() -> None:
    gone = delete(addresses).returning(addresses.c.id, addresses.c.city).cte("gone")
    stmt = insert(audit_log).from_select(["id", "message"], select(gone.c.id, gone.c.city))
    assert dml_write_tags(stmt) == w("audit.log", "addresses")


def test_text_fragment_inside_a_select_is_read() -> None:
    stmt = select(User).where(text("users.id IN (SELECT user_id FROM addresses)"))
    assert reads(stmt) == t("users", "addresses")


def test_unparsable_text_fragment_makes_reads_unknown() -> None:
    stmt = select(User).where(text("users.id IN ((( nonsense"))
    assert reads(stmt) is None


# --- the serve rule ---------------------------------------------------------------------

seq = Sequence("order_numbers")

NOT_CACHEABLE = {
    "for update": select(User).with_for_update(),
    "for share": select(User).with_for_update(read=True),
    "nowait": select(User).with_for_update(nowait=True),
    "skip locked": select(User).with_for_update(skip_locked=True),
    "of": select(User).join(User.addresses).with_for_update(of=User),
    "all forms": select(User).with_for_update(read=True, nowait=True, skip_locked=True, of=User),
    "locked subquery": select(select(User.id).with_for_update().subquery().c.id),
    "locked in": select(User).where(User.id.in_(select(Address.user_id).with_for_update())),
    "locked cte": select(select(User.id).with_for_update().cte("c").c.id),
    "locked union": union(select(User.id).with_for_update(), select(Address.user_id)),
    "func.now": select(User).where(User.name == func.now()),
    "func.NOW": select(User).where(User.name == func.NOW()),
    "current_timestamp": select(func.current_timestamp()),
    "sa now class": select(sa_functions.now()),
    "current_date": select(User.id).where(User.name > func.current_date()),
    "localtimestamp": select(func.localtimestamp()),
    "random order": select(User).order_by(func.random()),
    "rand": select(func.rand()),
    "gen_random_uuid": select(func.gen_random_uuid()),
    "sequence": select(seq.next_value()),
    "func.next_value": select(func.next_value(seq)),
    "current_user": select(sa_functions.current_user()),
    "session_user": select(User).where(User.name == func.session_user()),
    "user()": select(func.user()),
    "database()": select(func.database()),
    "last_insert_id": select(func.last_insert_id()),
    "udf in where": select(User).where(func.is_allowed(User.id)),
    "qualified udf": select(func.app.lower(User.name)),
    "now in a join": select(User).join(Address, and_(Address.user_id == User.id, func.now() > 0)),
    "now in a subquery": select(User).where(
        User.id.in_(select(Address.user_id).where(Address.city != func.now()))
    ),
    "now in a cte": select(select(func.now().label("t")).cte("c")),
    "now in group by": select(func.count()).select_from(User).group_by(func.now()),
    "now inside coalesce": select(func.coalesce(User.name, func.now())),
    "literal_column now": select(User.id, literal_column("now()")),
    "literal_column current_user": select(literal_column("current_user")),
    "text fragment now": select(User).where(text("users.created_at > now()")),
    "text fragment 'now'": select(User).where(text("users.name > 'now'::timestamp")),
    "text fragment udf": select(User).where(text("writes_audit(users.id)")),
    "text fragment locking": select(User).from_statement(text("SELECT * FROM users FOR UPDATE")),
    "update cte": select(
        update(User).where(User.id == 1).values(name="x").returning(User.id).cte("u")
    ),
    "insert cte": select(insert(users).values(name="x").returning(users.c.id).cte("i")),
    "delete cte": select(delete(addresses).returning(addresses.c.id).cte("d")),
    "unparsable fragment": select(User).where(text("users.id IN ((( nonsense")),
}


@pytest.mark.parametrize("name", NOT_CACHEABLE)
def test_never_cached(name: str) -> None:
    reason = uncacheable_reason(NOT_CACHEABLE[name], "postgresql")
    assert reason is not None


CACHEABLE = {
    "pk": select(User).where(User.id == 1),
    "join": select(User).join(User.addresses).where(Address.city == "x"),
    "outer join": select(User, Address).outerjoin(User.addresses),
    "self join": select(Node).join(aliased(Node), Node.children),
    "joinedload": select(User).options(joinedload(User.addresses)),
    "selectinload": select(User).options(selectinload(User.groups)),
    "selectin + column_property": select(Order),
    "inheritance": select(Manager).where(Manager.budget > 1),
    "in_": select(User).where(User.id.in_([1, 2, 3])),
    "between": select(User).where(between(User.id, 1, 5)),
    "like": select(User).where(User.name.like("a%"), User.email.ilike("%B%")),
    "cast": select(cast(User.id, String)),
    "case": select(case((User.id > 1, "big"), else_="small")),
    "aggregates": select(
        User.name,
        func.count(Address.id),
        func.sum(Address.id),
        func.min(Address.id),
        func.max(Address.id),
        func.avg(Address.id),
    )
    .join(User.addresses)
    .group_by(User.name)
    .having(func.count(Address.id) > 1),
    "string functions": select(
        func.lower(User.name),
        func.upper(User.name),
        func.coalesce(User.name, ""),
        func.length(User.name),
        func.char_length(User.name),
        func.trim(User.name),
        func.substr(User.name, 1, 2),
        func.concat(User.name, "x"),
        func.nullif(User.name, ""),
        func.round(User.id, 2),
        func.abs(User.id),
        func.greatest(User.id, 1),
    ),
    "window": select(
        func.row_number().over(order_by=User.id),
        func.rank().over(order_by=User.id),
        func.dense_rank().over(order_by=User.id),
    ),
    "array_agg": select(func.array_agg(User.id), func.string_agg(User.name, ",")),
    "json": select(func.json_extract(User.name, "$.a"), func.jsonb_build_object("a", User.id)),
    "exists": select(User).where(exists().where(Address.user_id == User.id)),
    "scalar subquery": select(
        User.name,
        select(func.count(Address.id)).where(Address.user_id == User.id).scalar_subquery(),
    ),
    "recursive cte": select(Node.id).where(
        Node.id.in_(select(Node.id).cte("c", recursive=True).select())
    ),
    "union": union(select(User.id), select(Address.user_id)),
    "literal": select(literal(1), literal_column("1"), User.id).where(or_(User.id == 1)),
    "text fragment": select(User).where(text("users.id > 1 AND lower(users.name) = 'a'")),
    "limit offset": select(User).order_by(User.id).limit(5).offset(10),
    "distinct": select(User.name).distinct(),
}


@pytest.mark.parametrize("name", CACHEABLE)
def test_ordinary_queries_are_cacheable(name: str) -> None:
    assert uncacheable_reason(CACHEABLE[name], "postgresql") is None
    assert select_write_tags(CACHEABLE[name], "postgresql") == set()


def test_reasons_say_what_is_wrong() -> None:
    lock = uncacheable_reason(select(User).with_for_update(skip_locked=True))
    assert lock is not None
    assert "FOR UPDATE SKIP LOCKED" in lock
    assert "FOR SHARE" in (uncacheable_reason(select(User).with_for_update(read=True)) or "")
    assert "now()" in (uncacheable_reason(select(func.now())) or "")
    assert "random()" in (uncacheable_reason(select(func.random())) or "")
    udf = uncacheable_reason(select(func.is_allowed(1))) or ""
    assert "is_allowed()" in udf
    assert "may write" in udf
    cte = select(update(users).values(name="x").returning(users.c.id).cte("u"))
    assert "writes users" in (uncacheable_reason(cte) or "")


def test_allow_time_accepts_time_functions_only() -> None:
    for stmt in (
        select(User).where(User.name > func.now()),
        select(func.current_timestamp()),
        select(func.current_date()),
        select(func.localtimestamp()),
        select(User).where(text("users.name > now()")),
        text("SELECT * FROM users WHERE created_at > CURRENT_TIMESTAMP"),
    ):
        assert uncacheable_reason(stmt, "postgresql") is not None
        assert uncacheable_reason(stmt, "postgresql", allow_time=True) is None
    for stmt in (
        select(func.random(), func.now()),
        select(seq.next_value()),
        select(func.current_user()),
        select(func.is_allowed(1), func.now()),
        select(User).with_for_update(),
    ):
        assert uncacheable_reason(stmt, "postgresql", allow_time=True) is not None


def test_writing_selects_report_their_writes() -> None:
    upd = select(update(User).where(User.id == 1).values(name="x").returning(User.id).cte("u"))
    assert select_write_tags(upd) == w("users")
    ins = select(insert(addresses).values(city="x").returning(addresses.c.id).cte("i"))
    assert select_write_tags(ins) == w("addresses")
    assert select_write_tags(select(func.is_allowed(1))) == {NAMESPACE_TAG}
    assert select_write_tags(select(User).where(text("writes_audit(users.id)"))) == {NAMESPACE_TAG}
    assert select_write_tags(select(func.now(), func.random())) == set()
    rules = FunctionRules(writes={"is_allowed": frozenset({"audit.log"})})
    assert select_write_tags(select(func.is_allowed(1)), functions=rules) == w("audit.log")


def test_declared_deterministic_function_is_cacheable() -> None:
    rules = FunctionRules(deterministic=frozenset({"price_of"}))
    stmt = select(func.price_of(User.id))
    assert uncacheable_reason(stmt) is not None
    assert uncacheable_reason(stmt, functions=rules) is None
    stable = FunctionRules(read_only=frozenset({"price_of"}))
    assert uncacheable_reason(stmt, functions=stable) is not None
    assert select_write_tags(stmt, functions=stable) == set()


TEXT_NOT_CACHEABLE = [
    ("SELECT * FROM users FOR UPDATE", "postgresql"),
    ("SELECT * FROM users FOR SHARE SKIP LOCKED", "postgresql"),
    ("SELECT * FROM users WHERE id IN (SELECT id FROM users FOR UPDATE)", "postgresql"),
    ("SELECT * FROM users LOCK IN SHARE MODE", "mysql"),
    ("SELECT * FROM users WHERE created_at > now()", "postgresql"),
    ("SELECT * FROM users WHERE created_at > 'now'", "postgresql"),
    ("SELECT date('now')", "sqlite"),
    ("SELECT * FROM users ORDER BY rand()", "mysql"),
    ("SELECT uuid()", "mysql"),
    ("SELECT nextval('s')", "postgresql"),
    ("SELECT current_user", "postgresql"),
    ("SELECT user", "postgresql"),
    ("SELECT user()", "mysql"),
    ("SELECT writing_fn()", "postgresql"),
    ("WITH u AS (UPDATE users SET name = 'x' RETURNING id) SELECT * FROM u", "postgresql"),
    ("SELECT 1; SELECT 2", "postgresql"),
    ("garbage", "postgresql"),
]


@pytest.mark.parametrize(("sql", "dialect"), TEXT_NOT_CACHEABLE)
def test_text_never_cached(sql: str, dialect: str) -> None:
    assert uncacheable_reason(text(sql), dialect) is not None


def test_text_plain_read_is_cacheable() -> None:
    sql = "SELECT u.id, lower(u.name), count(*) FROM users u JOIN addresses a ON a.user_id = u.id"
    assert uncacheable_reason(text(sql + " GROUP BY u.id, u.name"), "postgresql") is None


def test_a_statement_that_does_not_compile_is_read_by_whole_tables() -> None:
    """Without the compiled SQL, ORM joins still count and no partition is trusted."""
    from sqlalchemy.dialects.postgresql import aggregate_order_by

    stmt = (
        select(User.id, func.array_agg(aggregate_order_by(Address.city, Address.id)))
        .join(User.addresses)
        .where(User.id == 1)
        .group_by(User.id)
    )
    assert reads(stmt, dialect="postgresql") == p(users, "id", 1) | t("addresses")
    assert reads(stmt, dialect="oracle") == t("users", "addresses")


def test_loader_criteria_reading_another_table_is_read() -> None:
    from sqlalchemy.orm import with_loader_criteria

    allowed = select(Address.user_id).where(Address.city == "x")
    stmt = (
        select(User).where(User.id == 1).options(with_loader_criteria(User, User.id.in_(allowed)))
    )
    # The criteria's subquery reads addresses; users is still read once, so its
    # partition stays.
    assert reads(stmt) == p(users, "id", 1) | t("addresses")


def test_text_read_of_a_default_schema_name_matches_the_model() -> None:
    """``public.users`` in a fragment is the ``users`` table of the model."""
    stmt = select(User).where(text("users.id IN (SELECT id FROM public.users)"))
    assert reads(stmt) == t("users")
