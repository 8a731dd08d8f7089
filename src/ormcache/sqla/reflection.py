"""Reading what the database writes on its own out of its catalog, one dialect at a time.

:func:`read_catalog` runs a handful of catalog queries on a DBAPI connection and returns
:class:`CatalogFacts`: which tables a write to a table may also write (foreign-key
actions, triggers, PostgreSQL rules), which views read which tables, and what the
application's own functions and procedures may write. It is only called by
:mod:`.catalog`, which caches the answer per engine.

Trigger, rule and routine bodies are procedural code (PL/pgSQL, MariaDB's compound
statements, SQLite's trigger programs), not plain SQL. Their statements are found by
tokenizing the body with sqlglot: each INSERT / UPDATE / DELETE / MERGE / TRUNCATE /
REPLACE up to its semicolon is parsed on its own, and each call of one of the
database's own routines is followed. Anything else that could write (dynamic SQL with
``EXECUTE`` or ``PREPARE``, a statement that does not parse, a routine whose body cannot
be read or is not SQL) makes the body's writes unknown, which the caller treats as a
write to the whole namespace.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlglot
from sqlglot import TokenType
from sqlglot.errors import SqlglotError

from .rawsql import sql_facts, sqlglot_dialect

__all__ = ["Body", "CatalogFacts", "Routine", "read_catalog", "scan_body"]

_DML = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "REPLACE"})
# A DML word after these is part of another clause (FOR UPDATE, ON DELETE, INSERT OR
# REPLACE, BEFORE INSERT, UPDATE OF), not a statement.
_NOT_A_STATEMENT = frozenset({"FOR", "ON", "OR", "BEFORE", "AFTER", "OF", "INSTEAD", "KEY"})
_DYNAMIC = frozenset({"EXECUTE", "PREPARE"})
_VAR = TokenType.VAR
_RETURNING_INTO = re.compile(
    r"\bRETURNING\b(.*?)\bINTO\b(\s+STRICT)?\s+[\w.]+(\s*,\s*[\w.]+)*\s*$", re.I | re.S
)


@dataclass(frozen=True)
class Body:
    """What a piece of procedural code writes: table names (as spelled, every variant a
    ``Table.fullname`` could have), the routines it calls, and whether it may write
    anything else."""

    writes: frozenset[str] = frozenset()
    calls: frozenset[str] = frozenset()
    unknown: bool = False


_UNKNOWN = Body(unknown=True)


def scan_body(body: str | None, dialect: str) -> Body:
    """The writes of a trigger, rule or routine body (see the module docstring)."""
    if body is None:
        return _UNKNOWN
    read = sqlglot_dialect(dialect)
    try:
        tokens = sqlglot.Dialect.get_or_raise(read).tokenize(body)
    except SqlglotError:
        return _UNKNOWN
    writes: set[str] = set()
    calls: set[str] = set()
    start: int | None = None
    for i, tok in enumerate(tokens):
        word = tok.text.upper() if tok.token_type is not TokenType.STRING else ""
        if tok.token_type is TokenType.SEMICOLON:
            if start is not None and not _statement(body[start : tok.start], read, writes, calls):
                return _UNKNOWN
            start = None
            continue
        if word in _DYNAMIC:
            return _UNKNOWN
        previous = tokens[i - 1].text.upper() if i else ""
        if start is None and word in _DML and previous not in _NOT_A_STATEMENT:
            start = tok.start
        if word == "CALL" and i + 1 < len(tokens):
            # MySQL's tokenizer keeps "CALL p(1)" as a command and its text.
            target = tokens[i + 1].text.split("(", 1)[0].strip().strip('`"')
            calls.add(target.lower())
        elif tok.token_type is TokenType.L_PAREN and i and tokens[i - 1].token_type == _VAR:
            name = tokens[i - 1].text.lower()
            if i >= 3 and tokens[i - 2].token_type is TokenType.DOT:
                name = f"{tokens[i - 3].text.lower()}.{name}"
            calls.add(name)
    if start is not None and not _statement(body[start:], read, writes, calls):
        return _UNKNOWN
    return Body(frozenset(writes), frozenset(calls))


def _statement(sql: str, read: str | None, writes: set[str], calls: set[str]) -> bool:
    sql = sql.strip().removesuffix("END").strip()
    if _RETURNING_INTO.search(sql):
        # PL/pgSQL's RETURNING … INTO variable: the INTO names no table.
        sql = _RETURNING_INTO.sub(lambda m: f"RETURNING{m.group(1)}", sql)
    facts = sql_facts(sql, "postgresql" if read == "postgres" else read)
    if not facts.understood or facts.writes_unknown:
        return False
    writes |= facts.writes
    calls |= facts.functions
    return True


@dataclass(frozen=True)
class Routine:
    """One function or procedure (all its overloads): its volatility, where known, and
    what its bodies write."""

    volatility: str  # "i" immutable, "s" stable, "v" volatile (PostgreSQL's letters)
    body: Body


@dataclass(frozen=True)
class CatalogFacts:
    """A database's own writes, as read from its catalog. Table names are qualified
    (``schema.table``); ``default_schemas`` are those a bare name may mean."""

    default_schemas: frozenset[str] = frozenset()
    #: table -> tables its foreign-key actions write (children whose rows cascade).
    actions: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: table -> what its triggers and rules write.
    triggers: Mapping[str, tuple[Body, ...]] = field(default_factory=dict)
    #: view -> the tables (and views) it reads.
    views: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: routine name (bare when in a default schema, and qualified) -> what it is.
    routines: Mapping[str, Routine] = field(default_factory=dict)


def read_catalog(dbapi_connection: Any, dialect: str) -> CatalogFacts | None:
    """The catalog of the database behind ``dbapi_connection``; None for a dialect whose
    catalog ormcache does not read (metadata and declarations then stand alone)."""
    reader = _READERS.get(dialect)
    if reader is None:
        return None
    cursor = dbapi_connection.cursor()
    try:
        return reader(cursor)
    finally:
        cursor.close()


def _rows(cursor: Any, sql: str) -> list[tuple[Any, ...]]:
    cursor.execute(sql)
    return [tuple(row) for row in cursor.fetchall()]


def _group(pairs: Iterable[tuple[str, str]]) -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {}
    for key, value in pairs:
        out.setdefault(key, set()).add(value)
    return {k: frozenset(v) for k, v in out.items()}


def _routines(
    rows: Iterable[tuple[str, str, str, Body]], defaults: frozenset[str]
) -> dict[str, Routine]:
    """(schema, name, volatility, body) rows -> routines by qualified and (in a default
    schema) bare name; overloads combine to the least safe of them."""
    merged: dict[str, Routine] = {}
    for schema, name, volatility, body in rows:
        keys = [f"{schema}.{name}".lower()]
        if schema in defaults:
            keys.append(name.lower())
        for key in keys:
            old = merged.get(key)
            if old is not None:
                volatility = max(volatility, old.volatility, key="isv".index)
                body = Body(
                    old.body.writes | body.writes,
                    old.body.calls | body.calls,
                    old.body.unknown or body.unknown,
                )
            merged[key] = Routine(volatility, body)
    return merged


# -- PostgreSQL ------------------------------------------------------------------------
_PG_FK = """
SELECT pn.nspname || '.' || p.relname, cn.nspname || '.' || c.relname
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE con.contype = 'f'
  AND (con.confdeltype IN ('c', 'n', 'd') OR con.confupdtype IN ('c', 'n', 'd'))
"""
_PG_TRIGGERS = """
SELECT n.nspname || '.' || c.relname, l.lanname, p.prosrc
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_language l ON l.oid = p.prolang
WHERE NOT t.tgisinternal
"""
_PG_RULES = "SELECT schemaname || '.' || tablename, definition FROM pg_rules"
_PG_VIEWS = """
SELECT DISTINCT vn.nspname || '.' || v.relname, tn.nspname || '.' || t.relname
FROM pg_rewrite r
JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_depend d ON d.objid = r.oid AND d.classid = 'pg_rewrite'::regclass
    AND d.refclassid = 'pg_class'::regclass
JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
WHERE v.relkind = 'v' AND t.oid <> v.oid
  AND vn.nspname <> 'information_schema' AND vn.nspname NOT LIKE 'pg\\_%'
"""
_PG_ROUTINES = """
SELECT n.nspname, p.proname, p.provolatile, l.lanname, p.prosrc
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND p.prokind IN ('f', 'p')
"""


def _read_postgresql(cursor: Any) -> CatalogFacts:
    cursor.execute("SET LOCAL statement_timeout = 5000")
    defaults = frozenset(r[0] for r in _rows(cursor, "SELECT unnest(current_schemas(false))"))
    triggers: dict[str, list[Body]] = {}
    for table, language, source in _rows(cursor, _PG_TRIGGERS):
        body = scan_body(source, "postgresql") if language == "plpgsql" else _UNKNOWN
        triggers.setdefault(table, []).append(body)
    for table, definition in _rows(cursor, _PG_RULES):
        _, _, action = str(definition).partition(" DO ")
        triggers.setdefault(table, []).append(scan_body(action, "postgresql"))
    routines = []
    for schema, name, volatility, language, source in _rows(cursor, _PG_ROUTINES):
        body = scan_body(source, "postgresql") if language in ("plpgsql", "sql") else _UNKNOWN
        routines.append((schema, name, volatility, body))
    return CatalogFacts(
        default_schemas=defaults,
        actions=_group(_rows(cursor, _PG_FK)),
        triggers={k: tuple(v) for k, v in triggers.items()},
        views=_group(_rows(cursor, _PG_VIEWS)),
        routines=_routines(routines, defaults),
    )


# -- MySQL / MariaDB ------------------------------------------------------------------
_MY_FK = """
SELECT CONCAT(UNIQUE_CONSTRAINT_SCHEMA, '.', REFERENCED_TABLE_NAME),
       CONCAT(CONSTRAINT_SCHEMA, '.', TABLE_NAME)
FROM information_schema.REFERENTIAL_CONSTRAINTS
WHERE CONSTRAINT_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')
  AND (DELETE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT')
       OR UPDATE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT'))
"""
_MY_TRIGGERS = """
SELECT CONCAT(EVENT_OBJECT_SCHEMA, '.', EVENT_OBJECT_TABLE), ACTION_STATEMENT
FROM information_schema.TRIGGERS
WHERE TRIGGER_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')
"""
_MY_VIEWS = """
SELECT TABLE_SCHEMA, TABLE_NAME, VIEW_DEFINITION FROM information_schema.VIEWS
WHERE TABLE_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')
"""
_MY_ROUTINES = """
SELECT ROUTINE_SCHEMA, ROUTINE_NAME, ROUTINE_DEFINITION FROM information_schema.ROUTINES
WHERE ROUTINE_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')
"""


def _read_mysql(cursor: Any) -> CatalogFacts:
    defaults = frozenset(r[0] for r in _rows(cursor, "SELECT DATABASE()") if r[0])
    triggers: dict[str, list[Body]] = {}
    for table, statement in _rows(cursor, _MY_TRIGGERS):
        triggers.setdefault(table, []).append(scan_body(statement, "mysql"))
    views: list[tuple[str, str]] = []
    for schema, name, definition in _rows(cursor, _MY_VIEWS):
        facts = sql_facts(str(definition or ""), "mysql")
        # A view this user may not see the text of reads what it likes: every table.
        bases = facts.reads if facts.understood else frozenset({"*"})
        view = f"{schema}.{name}"
        views += [(view, base if "." in base else f"{schema}.{base}") for base in bases]
    routines = [
        (schema, name, "v", scan_body(definition, "mysql"))
        for schema, name, definition in _rows(cursor, _MY_ROUTINES)
    ]
    return CatalogFacts(
        default_schemas=defaults,
        actions=_group(_rows(cursor, _MY_FK)),
        triggers={k: tuple(v) for k, v in triggers.items()},
        views=_group(views),
        routines=_routines(routines, defaults),
    )


# -- SQLite ------------------------------------------------------------------------------
def _read_sqlite(cursor: Any) -> CatalogFacts:
    objects = _rows(cursor, "SELECT type, name, tbl_name, sql FROM sqlite_master")
    actions: list[tuple[str, str]] = []
    triggers: dict[str, list[Body]] = {}
    views: list[tuple[str, str]] = []
    for kind, name, table, sql in objects:
        if kind == "table":
            # Quoted as an identifier: the name comes from the catalog, not from a user.
            pragma = 'PRAGMA foreign_key_list("' + str(name).replace('"', '""') + '")'
            for row in _rows(cursor, pragma):
                parent, on_update, on_delete = row[2], row[5], row[6]
                if {str(on_update).upper(), str(on_delete).upper()} & _ACTIONS:
                    actions.append((f"main.{parent}", f"main.{name}"))
        elif kind == "trigger":
            _, _, program = str(sql or "").upper().partition("BEGIN")
            start = len(str(sql)) - len(program)
            body = scan_body(str(sql)[start:], "sqlite") if program else _UNKNOWN
            triggers.setdefault(f"main.{table}", []).append(body)
        elif kind == "view":
            _, _, query = str(sql or "").partition(" AS ")
            facts = sql_facts(query, "sqlite")
            bases = facts.reads if facts.understood else frozenset({"*"})
            views += [(f"main.{name}", b if "." in b else f"main.{b}") for b in bases]
    return CatalogFacts(
        default_schemas=frozenset({"main"}),
        actions=_group(actions),
        triggers={k: tuple(v) for k, v in triggers.items()},
        views=_group(views),
    )


_ACTIONS = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})
_READERS = {
    "postgresql": _read_postgresql,
    "mysql": _read_mysql,
    "mariadb": _read_mysql,
    "sqlite": _read_sqlite,
}
