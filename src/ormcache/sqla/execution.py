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
import re
from typing import Any

from sqlalchemy import Table, text
from sqlalchemy.sql import Delete, Insert, Update
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import CompoundSelect, Select

from ormcache.protocol import NAMESPACE_TAG

from .analysis import (
    FunctionRules,
    dml_write_tags,
    read_structure,
    select_write_tags,
    text_is_read,
    text_read_tags,
    text_write_tags,
    uncacheable_reason,
)
from .catalog import Declarations, catalog_rules, ddl_running, function_rules, note_metadata
from .tags import any_partition_tag, partition_tag, table_tag

__all__ = ["execution_read_tags", "execution_serve_reason", "execution_write_tags"]

_DML = (Insert, Update, Delete)
_NOT_MEMOIZED = object()


def execution_write_tags(
    context: Any, statement: str, dialect: str, declared: Declarations | None = None
) -> set[str] | None:
    """The tags this execution writes, or None if it provably only reads.

    Anything that is not provably a read is a write: SQL that cannot be understood, or
    that calls a function that may write, bumps the namespace. What a function or
    procedure writes is taken from ``declared`` first and then, only for a statement
    that would otherwise write the whole namespace, from the database's catalog (read
    once per engine): a STABLE or IMMUTABLE PostgreSQL function writes nothing, and a
    routine whose body names its writes writes those tables.
    """
    engine = getattr(context, "engine", None)
    ddl = _is_ddl(context, statement)
    # DDL may add or drop triggers, foreign-key actions and routines: the catalog is read
    # again at the next write, never during the DDL statement (it has not run yet).
    ddl_running(engine if ddl else None)
    first = _write_tags(context, statement, dialect, declared.rules if declared else None)
    if ddl or first is None or NAMESPACE_TAG not in first or engine is None:
        return first
    rules = function_rules(getattr(context, "root_connection", engine), declared)
    if not (rules.writes or rules.read_only or rules.deterministic):
        return first
    return _write_tags(context, statement, dialect, rules)


def _write_tags(
    context: Any, statement: str, dialect: str, rules: FunctionRules | None
) -> set[str] | None:
    compiled: Any = getattr(context, "compiled", None)
    stmt = None if compiled is None else compiled.statement
    if stmt is None or isinstance(stmt, TextClause):
        # Driver SQL (``exec_driver_sql``) or ``text()``: the SQL string itself.
        called = _called_procedure(statement)
        if called is not None and rules is not None and called in rules.writes:
            return {tag for t in rules.writes[called] for tag in (f"t:{t}", f"a:{t}")} or None
        if text_is_read(statement, dialect, rules):
            return None
        return text_write_tags(statement, dialect, rules) or {NAMESPACE_TAG}
    # A compiled statement is cached by SQLAlchemy per shape: judge each shape once per
    # set of function rules.
    memo: Any = getattr(compiled, "_ormcache_writes", None)
    if memo is not None and memo[0] is rules:
        found = memo[1]
    else:
        found = _compiled_write_tags(stmt, dialect, rules)
        with contextlib.suppress(AttributeError):  # a compiler with __slots__
            compiled._ormcache_writes = (rules, found)
    return None if found is None else set(found)


_CALL = re.compile(r"^\s*CALL\s+([\w.`\"]+)\s*\(", re.IGNORECASE)
_DDL_WORDS = re.compile(r"^\s*(CREATE|ALTER|DROP|RENAME|DO)\b", re.IGNORECASE)


def _called_procedure(statement: str) -> str | None:
    """``CALL proc(...)`` -> ``proc`` (lower case; dotted when qualified)."""
    found = _CALL.match(statement)
    return None if found is None else found.group(1).replace("`", "").replace('"', "").lower()


def _is_ddl(context: Any, statement: str) -> bool:
    compiled = getattr(context, "compiled", None)
    stmt = None if compiled is None else compiled.statement
    if isinstance(stmt, ExecutableDDLElement):
        return True
    return (stmt is None or isinstance(stmt, TextClause)) and bool(_DDL_WORDS.match(statement))


def _compiled_write_tags(
    stmt: Any, dialect: str, rules: FunctionRules | None
) -> frozenset[str] | None:
    if isinstance(stmt, _DML):
        table = getattr(stmt, "table", None)
        note_metadata(getattr(table, "metadata", None))
        return frozenset(dml_write_tags(stmt))
    if isinstance(stmt, ExecutableDDLElement):
        return frozenset(_ddl_tags(stmt))
    if isinstance(stmt, (Select, CompoundSelect)):
        # Data-modifying CTEs and functions that may write make a SELECT a write.
        written = select_write_tags(stmt, dialect, rules)
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
    if _calls_unvouched(context, compiled, stmt, dialect):
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


_NO_RULES = FunctionRules()


def _calls_unvouched(context: Any, compiled: Any, stmt: Any, dialect: str) -> bool:
    """Whether a read calls a routine of the application's that is not known to be
    deterministic (IMMUTABLE in the catalog, if the catalog has been read): such a read
    is no write, but its result may depend on what the routine reads or on the moment,
    so it is never stored."""
    rules = catalog_rules(getattr(context, "engine", None))
    memo: Any = getattr(compiled, "_ormcache_unvouched", None)
    if memo is not None and memo[0] is rules:
        return bool(memo[1])
    deterministic = FunctionRules(deterministic=rules.deterministic) if rules else _NO_RULES
    found = NAMESPACE_TAG in select_write_tags(stmt, dialect, deterministic)
    with contextlib.suppress(AttributeError):
        compiled._ormcache_unvouched = (rules, found)
    return found
