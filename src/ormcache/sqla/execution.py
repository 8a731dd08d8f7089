"""What one execution reads or writes, judged from what is actually sent.

The cursor-level listeners see every statement on a watched engine, whichever API sent it.
These functions turn one execution (SQLAlchemy's ``ExecutionContext`` and the SQL string)
into tags, using ``analysis`` for the rules. Judging the statement as compiled, rather
than as the application built it, is what makes the answer complete: eager-load joins,
``column_property`` subqueries and loader criteria are in the compiled statement, and the
parameter values are this execution's own, never those of the statement the compiled
form was cached from.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import Table, text
from sqlalchemy.sql import Delete, Insert, Update
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import CompoundSelect, Select

from ormcache.protocol import NAMESPACE_TAG

from .analysis import (
    dml_write_tags,
    read_structure,
    select_write_tags,
    text_is_read,
    text_read_tags,
    text_write_tags,
    uncacheable_reason,
)
from .tags import any_partition_tag, partition_tag, table_tag

__all__ = ["execution_read_tags", "execution_serve_reason", "execution_write_tags"]

_DML = (Insert, Update, Delete)
_NOT_MEMOIZED = object()


def execution_write_tags(context: Any, statement: str, dialect: str) -> set[str] | None:
    """The tags this execution writes, or None if it provably only reads.

    Anything that is not provably a read is a write: SQL that cannot be understood, or
    that calls a function that may write, bumps the namespace.
    """
    compiled: Any = getattr(context, "compiled", None)
    stmt = None if compiled is None else compiled.statement
    if stmt is None or isinstance(stmt, TextClause):
        # Driver SQL (``exec_driver_sql``) or ``text()``: the SQL string itself.
        if text_is_read(statement, dialect):
            return None
        return text_write_tags(statement, dialect) or {NAMESPACE_TAG}
    # A compiled statement is cached by SQLAlchemy per shape: judge each shape once.
    found: Any = getattr(compiled, "_ormcache_writes", _NOT_MEMOIZED)
    if found is _NOT_MEMOIZED:
        found = _compiled_write_tags(stmt, dialect)
        with contextlib.suppress(AttributeError):  # a compiler with __slots__
            compiled._ormcache_writes = found
    return None if found is None else set(found)


def _compiled_write_tags(stmt: Any, dialect: str) -> frozenset[str] | None:
    if isinstance(stmt, _DML):
        return frozenset(dml_write_tags(stmt))
    if isinstance(stmt, ExecutableDDLElement):
        return frozenset(_ddl_tags(stmt))
    if isinstance(stmt, (Select, CompoundSelect)):
        # Data-modifying CTEs and functions that may write make a SELECT a write.
        written = select_write_tags(stmt, dialect)
        return frozenset(written) if written else None
    return None


def _ddl_tags(stmt: Any) -> set[str]:
    """DDL invalidates what it touches: the table it names, else everything."""
    target = getattr(stmt, "element", None)
    table = target if isinstance(target, Table) else getattr(target, "table", None)
    if isinstance(table, Table):
        return {table_tag(table), any_partition_tag(table)}
    return {NAMESPACE_TAG}


def execution_read_tags(
    context: Any, statement: str, dialect: str, salt: bytes | None
) -> set[str] | None:
    """The tags this (read) execution depends on, or None if they cannot be bounded.

    Partition values come from this execution's parameters, matched to the compiled
    statement's own bound parameters (never the values the cached compiled form was
    first built with).
    """
    compiled = getattr(context, "compiled", None)
    stmt = None if compiled is None else compiled.statement
    if stmt is None or isinstance(stmt, TextClause):
        return text_read_tags(statement, dialect)
    if not isinstance(stmt, (Select, CompoundSelect)):
        return None
    structure = read_structure(stmt, dialect)
    if structure is None:
        return None
    tables, partition = structure
    params_list = getattr(context, "compiled_parameters", None) or []
    params = params_list[0] if len(params_list) == 1 else None
    names = getattr(compiled, "bind_names", {})
    out: set[str] = set()
    for table in tables:
        term = partition.get(table)
        tag = None
        if term is not None and params is not None:
            name = names.get(term[1])
            if name is not None and name in params:
                tag = partition_tag(table, term[0], params[name], salt)
        if tag is None:
            out.add(table_tag(table))
        else:
            out.add(tag)
            out.add(any_partition_tag(table))
    return out


def execution_serve_reason(
    context: Any, statement: str, dialect: str, allow_time: bool
) -> str | None:
    """Why a read executed inside a cached computation makes its value unstorable
    (a locking read, a non-deterministic or time function), or None."""
    compiled: Any = getattr(context, "compiled", None)
    stmt = None if compiled is None else compiled.statement
    if stmt is None or isinstance(stmt, TextClause):
        return uncacheable_reason(text(statement), dialect, allow_time=allow_time)
    found: Any = getattr(compiled, "_ormcache_serve", None)
    if found is None:
        found = (
            uncacheable_reason(stmt, dialect, allow_time=False),
            uncacheable_reason(stmt, dialect, allow_time=True),
        )
        with contextlib.suppress(AttributeError):  # a compiler with __slots__
            compiled._ormcache_serve = found
    return found[1] if allow_time else found[0]  # type: ignore[no-any-return]
