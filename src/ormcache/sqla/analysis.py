"""Statement analysis: which tags a statement reads or writes.

Pure functions of SQLAlchemy constructs (and SQL text with its dialect): no ``Cache``, no
backend, no I/O. The read path asks what a SELECT depends on; the write path asks what a
DML statement, a flush or a piece of raw SQL changes. Keeping this apart from the event
wiring is what makes the rules testable one statement at a time
(``tests/test_analysis.py``).

The answers err on the side of invalidating more: an unknown read is ``None`` (the caller
does not cache), an unknown write is the whole namespace.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Table, inspect
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.sql import Select, sqltypes
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList, TextClause
from sqlalchemy.sql.operators import and_, eq
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.util import find_tables

from ormcache.protocol import NAMESPACE_TAG

from .functions import FunctionRules
from .rawsql import text_is_read, text_read_tags, text_write_tags
from .tags import (
    any_partition_tag,
    instance_tags,
    partition_columns,
    partition_tag,
    table_tag,
)

__all__ = [
    "FunctionRules",
    "bind_value",
    "dml_write_tags",
    "eq_terms",
    "exact_equality",
    "flush_write_tags",
    "mapper_closure",
    "option_tables",
    "partition_column_names",
    "read_structure",
    "statement_read_tags",
    "text_is_read",
    "text_read_tags",
    "text_write_tags",
]


def eq_terms(where: Any) -> Iterable[tuple[Column[Any], BindParameter[Any]]]:
    """``column = :param`` terms of a top-level AND; anything else is ignored (the
    statement is then tagged by whole tables, which is always safe)."""
    if where is None:
        return
    if isinstance(where, BooleanClauseList) and where.operator is and_:
        for clause in where.clauses:
            yield from eq_terms(clause)
    elif isinstance(where, BinaryExpression) and where.operator is eq:
        left, right = where.left, where.right
        if isinstance(right, Column) and isinstance(left, BindParameter):
            left, right = right, left
        if isinstance(left, Column) and isinstance(right, BindParameter):
            yield left, right


def bind_value(bind: BindParameter[Any], params: dict[str, Any] | None) -> object:
    if params and bind.key in params:
        return params[bind.key]
    return bind.effective_value


def mapper_closure(mapper: Mapper[Any], eager_only: bool) -> set[Table]:
    """Tables a load of ``mapper`` may read in the same statement (eager joins)."""
    seen: set[Mapper[Any]] = set()
    tables: set[Table] = set()
    stack = [mapper]
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        tables.update(t for t in m.tables if isinstance(t, Table))
        for rel in m.relationships:
            if eager_only and rel.lazy not in ("joined", "subquery"):
                continue
            if rel.secondary is not None and isinstance(rel.secondary, Table):
                tables.add(rel.secondary)
            stack.append(rel.mapper)
    return tables


def option_tables(stmt: Any) -> set[Table] | None:
    """Tables named by loader options (``joinedload`` and friends), or None if unsure."""
    tables: set[Table] = set()
    for opt in getattr(stmt, "_with_options", ()):
        if getattr(opt, "_is_ormcache", False):
            continue
        context = getattr(opt, "context", None)
        if context is None:
            if getattr(opt, "_is_criteria_option", False) or getattr(
                opt, "_is_compile_state", False
            ):
                continue
            return None
        for element in context:
            path = getattr(getattr(element, "path", None), "path", ())
            for entry in path:
                if isinstance(entry, Mapper):
                    tables.update(mapper_closure(entry, eager_only=True))
                elif hasattr(entry, "mapper") and isinstance(entry.mapper, Mapper):
                    tables.update(mapper_closure(entry.mapper, eager_only=True))
    return tables


_CASELESS_SQLITE = ("nocase", "rtrim")


def exact_equality(column: Column[Any], dialect: str | None) -> bool:
    """Whether ``column = value`` in this database means Python equality of the value.

    A partition tag is hashed from the value as spelled in the query, while writers hash
    the row's stored value. Where the database also matches other spellings (MySQL and
    MariaDB collations are case- and accent-insensitive unless binary; SQLite's NOCASE),
    the query is tagged by its whole table instead, which every write bumps.
    """
    collation = getattr(column.type, "collation", None)
    if not isinstance(column.type, sqltypes.String) or isinstance(
        column.type, (sqltypes.Enum, sqltypes.Uuid)
    ):
        return True
    if dialect in ("mysql", "mariadb"):
        name = str(collation or "").lower()
        return name.endswith("_bin") or name == "binary"
    if dialect == "sqlite":
        return not collation or collation.lower() not in _CASELESS_SQLITE
    return True


def read_structure(
    stmt: Any, dialect: str | None = None
) -> tuple[set[Table], dict[Table, tuple[Column[Any], BindParameter[Any]]]] | None:
    """Tables a SELECT reads, and for each, an equality term that bounds it (if any).

    None when the reads cannot be bounded (an option ormcache does not understand).
    """
    tables: set[Table] = {t for t in find_tables(stmt, include_crud=True) if isinstance(t, Table)}
    for desc in stmt.column_descriptions:
        entity = desc.get("entity")
        mapper = inspect(entity, raiseerr=False) if entity is not None else None
        if isinstance(mapper, Mapper):
            tables.update(mapper_closure(mapper, eager_only=True))
    extra = option_tables(stmt)
    if extra is None:
        return None
    tables.update(extra)
    partition: dict[Table, tuple[Column[Any], BindParameter[Any]]] = {}
    for column, bind in eq_terms(stmt.whereclause):
        table = column.table
        if not isinstance(table, Table) or table in partition:
            continue
        if column.name in partition_column_names(table) and exact_equality(column, dialect):
            partition[table] = (column, bind)
    return tables, partition


def statement_read_tags(
    stmt: Any,
    params: dict[str, Any] | None = None,
    salt: bytes | None = None,
    dialect: str | None = None,
) -> set[str] | None:
    """The tags a SELECT depends on, or None when its reads cannot be bounded.

    The primary table of a select with ``column = value`` on a primary key, unique or
    indexed column is tagged by that partition; every other table it touches (joins,
    eager loads, inheritance) by the whole table.
    """
    if isinstance(stmt, TextClause):
        return text_read_tags(stmt.text, dialect)
    if not isinstance(stmt, Select):
        return None
    structure = read_structure(stmt, dialect)
    if structure is None:
        return None
    tables, partition = structure
    out: set[str] = set()
    for table in tables:
        term = partition.get(table)
        tag = (
            None
            if term is None
            else partition_tag(table, term[0], bind_value(term[1], params), salt)
        )
        if tag is None:
            out.add(table_tag(table))
        else:
            out.add(tag)
            out.add(any_partition_tag(table))
    return out


_partition_names: dict[Table, frozenset[str]] = {}


def partition_column_names(table: Table) -> frozenset[str]:
    names = _partition_names.get(table)
    if names is None:
        names = _partition_names[table] = frozenset(c.name for c in partition_columns(table))
    return names


def dml_write_tags(stmt: Any) -> set[str]:
    table = getattr(stmt, "table", None)
    tables: set[Table] = set()
    if isinstance(table, Table):
        tables.add(table)
    entity = getattr(stmt, "entity_description", None)
    if entity:
        mapper = inspect(entity.get("entity"), raiseerr=False)
        if isinstance(mapper, Mapper):
            tables.update(t for t in mapper.tables if isinstance(t, Table))
    if not tables:
        return {NAMESPACE_TAG}
    return {tag for t in tables for tag in (table_tag(t), any_partition_tag(t))}


def flush_write_tags(session: Session, salt: bytes | None) -> set[str]:
    out: set[str] = set()
    for obj in session.new:
        out |= instance_tags(obj, salt=salt)
    for obj in session.deleted:
        out |= instance_tags(obj, salt=salt)
    for obj in session.dirty:
        state: Any = inspect(obj)
        if not state.modified:
            continue
        out |= instance_tags(obj, salt=salt)
        old: dict[str, object] = {}
        for prop in state.mapper.column_attrs:
            # Passive history: never load an attribute from inside a flush.
            hist = state.attrs[prop.key].history
            if hist.deleted:
                old[prop.key] = hist.deleted[0]
        if old:
            out |= instance_tags(obj, values=old, salt=salt)
        for rel in state.mapper.relationships:
            secondary = rel.secondary
            if isinstance(secondary, Table) and state.attrs[rel.key].history.has_changes():
                out |= {table_tag(secondary), any_partition_tag(secondary)}
    return out
