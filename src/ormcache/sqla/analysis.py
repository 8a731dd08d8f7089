"""Statement analysis: which tags a statement reads or writes, and whether it may be served.

Pure functions of SQLAlchemy constructs (and SQL text with its dialect): no ``Cache``, no
backend, no I/O. The read path asks what a SELECT depends on (:func:`statement_read_tags`)
and whether a hit may stand for it (:func:`uncacheable_reason`); the write path asks what
a DML statement, a flush, a writing SELECT or a piece of raw SQL changes. Keeping this
apart from the event wiring is what makes the rules testable one statement at a time
(``tests/test_analysis.py``).

This module is the one place callers import from. The work is split by concern:
:mod:`.rawsql` parses SQL text with sqlglot, :mod:`.functions` holds the deterministic
allowlist, :mod:`.serve` the serve rule, :mod:`.writes` DML and flushes, :mod:`.tags`
the tag names.

The answers err on the side of invalidating more: an unknown read is ``None`` (the caller
does not cache), an unknown write is the whole namespace.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import MetaData, Table, inspect
from sqlalchemy.dialects.mysql.base import MySQLDialect
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import CompoundSelect, Select, sqltypes, visitors
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ColumnClause,
    TextClause,
)
from sqlalchemy.sql.operators import and_, eq
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.util import find_tables

from .functions import FunctionRules
from .rawsql import SqlFacts, sql_facts, text_is_read, text_read_tags, text_write_tags
from .serve import select_write_tags, uncacheable_reason
from .tags import (
    any_partition_tag,
    comparable_type,
    partition_columns,
    partition_tag,
    table_tag,
)
from .writes import dml_write_tags, flush_write_tags

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
    "select_write_tags",
    "statement_read_tags",
    "text_is_read",
    "text_read_tags",
    "text_write_tags",
    "uncacheable_reason",
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
    """The value a bound parameter has in this execution: the execution's params win over
    the value (or callable) the statement was built with."""
    if params and bind.key in params:
        return params[bind.key]
    return bind.effective_value


# Relationships loaded with their parent, by the same statement or by one it triggers;
# an entry cached for the parent holds them too.
_EAGER = frozenset({"joined", "subquery", "selectin", "immediate"})


def mapper_closure(mapper: Mapper[Any], eager_only: bool) -> set[Table]:
    """Tables a load of ``mapper`` may read: its own, and those of eager relationships
    (followed transitively; with ``eager_only=False``, of every relationship)."""
    return _closure(mapper, eager_only)[0]


def _closure(mapper: Mapper[Any], eager_only: bool) -> tuple[set[Table], set[Table]]:
    """(all tables, tables reached through a relationship): a table in the second set
    holds rows other than the parent's, even when it is the parent's own table."""
    seen: set[Mapper[Any]] = set()
    tables: set[Table] = set()
    related: set[Table] = set()
    stack = [mapper]
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        tables.update(t for t in m.tables if isinstance(t, Table))
        for rel in m.relationships:
            if eager_only and rel.lazy not in _EAGER:
                continue
            related.update(_relationship_tables(rel))
            stack.append(rel.mapper)
    return tables | related, related


def _relationship_tables(rel: Any) -> set[Table]:
    found = {t for t in rel.mapper.tables if isinstance(t, Table)}
    if isinstance(rel.secondary, Table):
        found.add(rel.secondary)
    return found


def option_tables(stmt: Any) -> set[Table] | None:
    """Tables named by loader options (``joinedload`` and friends), or None if unsure."""
    found = _option_tables(stmt)
    return None if found is None else found[0]


def _option_tables(stmt: Any) -> tuple[set[Table], set[Table]] | None:
    """(all tables, tables reached through a relationship) of the loader options."""
    tables: set[Table] = set()
    related: set[Table] = set()
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
            for index, entry in enumerate(path):
                mapper = entry if isinstance(entry, Mapper) else getattr(entry, "mapper", None)
                if not isinstance(mapper, Mapper):
                    continue
                every, via = _closure(mapper, eager_only=True)
                tables |= every
                related |= via
                if index:  # the path's root is the parent; what follows is related
                    related |= {t for t in mapper.tables if isinstance(t, Table)}
                if getattr(entry, "secondary", None) is not None:
                    related |= _relationship_tables(entry)
                    tables |= related
    return tables, related


_CASELESS_SQLITE = ("nocase", "rtrim")
# PostgreSQL collations known to be deterministic by name: the built-in ones, libc
# locales (``en_US.utf8``) and the predefined ICU ones (``und-x-icu``). A collation
# created with ``deterministic = false`` has a name of the application's choosing.
_PG_DETERMINISTIC = re.compile(
    r"^(c|posix|default|ucs_basic|pg_c_utf8|pg_unicode_fast"
    r"|[a-z]{2,3}_[a-z]{2}(\.[a-z0-9_-]+)?(@[a-z]+)?|[a-z]{2,3}(-[a-z]{2,4})?-x-icu)$",
    re.IGNORECASE,
)


def exact_equality(column: Column[Any], dialect: str | None) -> bool:
    """Whether ``column = value`` in this database means Python equality of the value.

    A partition tag is hashed from the value as spelled in the query, while writers hash
    the row's stored value. Where the database also matches other spellings (MySQL and
    MariaDB collations are case- and accent-insensitive unless binary, ENUMs included;
    SQLite's NOCASE; PostgreSQL ``citext`` and nondeterministic collations), or the
    column's type transforms bound values (:func:`.tags.comparable_type`), the query is
    tagged by its whole table instead, which every write bumps. The collation is the
    column's own or, for a ``TypeDecorator`` that only relabels a type, its impl's.
    """
    kind = comparable_type(column.type)
    if kind is None:
        return False
    if not isinstance(kind, sqltypes.String) or isinstance(kind, sqltypes.Uuid):
        return True
    collation = str(getattr(kind, "collation", None) or "").lower()
    if dialect in ("mysql", "mariadb"):
        return collation.endswith("_bin") or collation == "binary"
    if isinstance(kind, sqltypes.Enum):
        return True
    if dialect == "sqlite":
        return collation not in _CASELESS_SQLITE
    if dialect == "postgresql":
        return type(kind).__name__.upper() != "CITEXT" and (
            not collation or _PG_DETERMINISTIC.match(collation) is not None
        )
    return True


def read_structure(
    stmt: Any, dialect: str | None = None
) -> tuple[set[Table], dict[Table, tuple[Column[Any], BindParameter[Any]]]] | None:
    """Tables a SELECT reads, and for each, an equality term that bounds it (if any).

    None when the reads cannot be bounded (an option ormcache does not understand, or
    SQL text inside the statement that cannot be parsed). The tables are the statement's
    ``Table`` objects, plus a stand-in ``Table`` with the same fullname for each table
    only its SQL names (text fragments, ``column_property`` subqueries, loader criteria).

    A partition is kept only where it bounds every row the statement reads from that
    table: the table appears once in the SQL the statement compiles to (a self-join, an
    alias, a subquery over the same table or a self-referential eager load reads other
    rows), and no relationship loaded with the result leads back to it.
    """
    if not isinstance(stmt, (Select, CompoundSelect)):
        return None
    tables: set[Table] = {t for t in find_tables(stmt, include_crud=True) if isinstance(t, Table)}
    related: set[Table] = set()
    if isinstance(stmt, Select):
        for desc in stmt.column_descriptions:
            entity = desc.get("entity")
            mapper = inspect(entity, raiseerr=False) if entity is not None else None
            if isinstance(mapper, Mapper):
                every, via = _closure(mapper, eager_only=True)
                tables |= every
                related |= via
        options = _option_tables(stmt)
        if options is None:
            return None
        tables |= options[0]
        related |= options[1]
    facts = _compiled_facts(stmt, dialect)
    if facts is None:
        # The SQL could not be read back: tables by whole table, unless there is text in
        # the statement whose tables only the SQL would tell.
        return _fallback(stmt, tables)
    found = set(tables)
    known = {t.fullname for t in tables}
    counts = dict.fromkeys(known, 0)
    for names in facts.references:
        hits = names & known
        for name in hits:
            counts[name] += 1
        if not hits:  # a table only the SQL names
            found |= {_stand_in(name) for name in names}
    partition: dict[Table, tuple[Column[Any], BindParameter[Any]]] = {}
    if isinstance(stmt, Select):
        for column, bind in eq_terms(stmt.whereclause):
            table = column.table
            if not isinstance(table, Table) or table in partition or table in related:
                continue
            if counts.get(table.fullname, 0) != 1:
                continue
            if column.name in partition_column_names(table) and exact_equality(column, dialect):
                partition[table] = (column, bind)
    return found, partition


_STAND_INS = MetaData()


def _stand_in(fullname: str) -> Table:
    """A ``Table`` whose only use is its fullname (for its tag); one per name."""
    schema, _, name = fullname.rpartition(".")
    key = fullname if schema else name
    table = _STAND_INS.tables.get(key)
    return table if table is not None else Table(name, _STAND_INS, schema=schema or None)


def _fallback(stmt: Any, tables: set[Table]) -> tuple[set[Table], dict[Any, Any]] | None:
    """Whole tables from SQLAlchemy's own FROM computation (ORM joins included), or
    None when that fails too or text in the statement may name more."""
    if _has_text(stmt):
        return None
    try:
        froms = stmt.get_final_froms() if isinstance(stmt, Select) else []
    except Exception:  # the same constructs that did not compile
        return None
    found = set(tables)
    for clause in froms:
        found |= {t for t in find_tables(clause, include_aliases=True) if isinstance(t, Table)}
    return found, {}


def _compiled_facts(stmt: Any, dialect: str | None) -> SqlFacts | None:
    """The facts of the SQL the statement compiles to, as the database will see it.

    Compiling expands what the statement object does not show: ORM joins along
    relationships, joined eager loads, ``column_property`` subqueries, loader criteria,
    and text fragments. None when it does not compile or parse.
    """
    cache_key = stmt._generate_cache_key()
    memo_key = None if cache_key is None else (cache_key.key, dialect)
    if memo_key is not None and memo_key in _facts_memo:
        return _facts_memo[memo_key]
    try:
        sql = str(stmt.compile(dialect=_sa_dialect(dialect), compile_kwargs=_RENDER))
    except Exception:  # exotic constructs: fall back to the conservative path
        return None
    facts: SqlFacts | None = sql_facts(sql, dialect)
    if facts is not None and not facts.understood:
        facts = None
    if memo_key is not None:
        if len(_facts_memo) >= _MEMO_LIMIT:
            _facts_memo.clear()
        _facts_memo[memo_key] = facts
    return facts


# SQLAlchemy's cache key -> the facts of the SQL it compiles to. Equal keys compile to the
# same SQL up to bound values, which is what SQLAlchemy's own compiled cache relies on.
_facts_memo: dict[tuple[Any, str | None], SqlFacts | None] = {}
_MEMO_LIMIT = 4096


_RENDER = {"render_postcompile": True}


@functools.cache
def _sa_dialect(name: str | None) -> Dialect:
    """A bare dialect to compile with: named parameters, which every grammar parses."""
    if name == "postgresql":
        return PGDialect(paramstyle="named")  # type: ignore[no-untyped-call]
    if name in ("mysql", "mariadb"):
        return MySQLDialect(paramstyle="named")
    if name == "sqlite":
        return SQLiteDialect(paramstyle="named")
    return DefaultDialect(paramstyle="named")


def _has_text(stmt: Any) -> bool:
    return any(
        isinstance(el, TextClause) or (isinstance(el, ColumnClause) and el.is_literal)
        for el in visitors.iterate(stmt)
    )


def statement_read_tags(
    stmt: Any,
    params: dict[str, Any] | None = None,
    salt: bytes | None = None,
    dialect: str | None = None,
) -> set[str] | None:
    """The tags a SELECT (or ``text()`` read) depends on, or None when its reads cannot
    be bounded.

    The primary table of a select with ``column = value`` on a primary key, unique or
    indexed column is tagged by that partition (plus ``a:<table>``); every other table
    it touches (joins, eager loads, inheritance, subqueries) by the whole table. Whether
    the statement may be served from cache at all is :func:`uncacheable_reason`'s call,
    and what a writing SELECT writes is :func:`select_write_tags`'.
    """
    if isinstance(stmt, TextClause):
        return text_read_tags(stmt.text, dialect)
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
    """Names of the columns whose equality partitions are tracked (memoized per table)."""
    names = _partition_names.get(table)
    if names is None:
        names = _partition_names[table] = frozenset(c.name for c in partition_columns(table))
    return names
