"""The serve rule: why a SELECT must never be answered from the cache.

A hit must be what the statement would do. Three kinds of SELECT do more than return
rows that only a write can change, and are never served from (nor stored in) the cache:

* **locking reads** — ``with_for_update()`` in any form, anywhere in the statement
  (``FOR UPDATE``, ``FOR SHARE``, ``NOWAIT``, ``SKIP LOCKED``, ``OF``; in SQL text also
  MySQL's ``LOCK IN SHARE MODE``): a hit takes no lock, so two ``SKIP LOCKED`` workers
  would both get the same row;
* **functions that are not on the deterministic allowlist** (:mod:`.functions`):
  ``now()``, ``random()``, sequences, ``current_user``, user-defined functions...;
  time functions alone may be allowed per query (``allow_time=True``), when a result as
  old as the entry's TTL is acceptable;
* **writes dressed as reads** — a ``select()`` over ``update(...).returning(...).cte()``
  (or insert/delete), a function that may write: :func:`select_write_tags` says what they
  write, so the caller can route them through the write path.

The walk covers the whole statement: columns, WHERE, ORDER BY, joins, subqueries, CTEs,
the ``column_property`` expressions of the entities it loads, and SQL text fragments
(``text()``, ``literal_column()``), which are parsed with sqlglot. Loader criteria
(``with_loader_criteria``) are out of scope. These functions run once per statement
shape: callers memoize them by SQLAlchemy's cache key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import Select, visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.functions import FunctionElement

from ormcache.protocol import NAMESPACE_TAG

from .functions import FunctionRules, classify
from .rawsql import SqlFacts, fragment_facts, sql_facts, text_write_tags
from .writes import dml_write_tags

__all__ = ["select_write_tags", "uncacheable_reason"]

# Reasons by importance: what a statement writes says more than what it calls.
_WRITES, _LOCKS, _MAY_WRITE, _VOLATILE, _TIME, _UNPARSED = range(6)


def uncacheable_reason(
    stmt: Any,
    dialect: str | None = None,
    allow_time: bool = False,
    functions: FunctionRules | None = None,
) -> str | None:
    """Why ``stmt`` must never be served from the cache, or None when it may be.

    ``stmt`` is a SQLAlchemy ``Select`` (or compound select, ``FromStatement``...) or a
    ``TextClause``. ``dialect`` is SQLAlchemy's dialect name, used to parse SQL text.
    ``allow_time=True`` is the documented per-query opt-in for time functions
    (``now()``, ``current_timestamp``, ``current_date``, ``localtimestamp``...): the
    caller accepts a result as old as the entry's TTL. Randomness, sequences, session
    state, user-defined functions, locks and writes are refused whatever it says.
    ``functions`` carries what the application declares about its own functions.
    """
    found = list(_reasons(stmt, dialect, allow_time, functions))
    return min(found)[1] if found else None


def select_write_tags(
    stmt: Any, dialect: str | None = None, functions: FunctionRules | None = None
) -> set[str]:
    """What a SELECT writes: empty for a plain read.

    The tables of every INSERT/UPDATE/DELETE nested in it (data-modifying CTEs), the
    tables a declared function writes, and ``NAMESPACE_TAG`` for a call of a function
    that may write, or SQL text that cannot be parsed.
    """
    if isinstance(stmt, TextClause):
        return text_write_tags(stmt.text, dialect, functions)
    out: set[str] = set()
    for el in _elements(stmt):
        if isinstance(el, UpdateBase):
            out |= dml_write_tags(el)
        elif isinstance(el, FunctionElement):
            out |= _call_writes(_function_name(el), functions)
        elif (text := _fragment(el)) is not None:
            facts = fragment_facts(text, dialect)
            if not facts.understood or facts.writes_unknown:
                out.add(NAMESPACE_TAG)
            out |= {tag for name in facts.writes for tag in (f"t:{name}", f"a:{name}")}
            for name in facts.functions:
                out |= _call_writes(name, functions)
    return out


def _reasons(
    stmt: Any, dialect: str | None, allow_time: bool, rules: FunctionRules | None
) -> Iterator[tuple[int, str]]:
    if isinstance(stmt, TextClause):
        yield from _facts_reasons(sql_facts(stmt.text, dialect), allow_time, rules)
        return
    for el in _elements(stmt):
        lock = getattr(el, "_for_update_arg", None)
        if lock is not None:
            yield _LOCKS, f"it is a locking read ({_describe_lock(lock)})"
        if isinstance(el, UpdateBase):
            table = getattr(getattr(el, "table", None), "fullname", "a table")
            yield _WRITES, f"it writes {table} (a data-modifying CTE): use the write path"
        elif isinstance(el, FunctionElement):
            reason = _call_reason(_function_name(el), allow_time, rules)
            if reason is not None:
                yield reason
        elif (text := _fragment(el)) is not None:
            facts = fragment_facts(text, dialect)
            if not facts.understood:
                yield _UNPARSED, f"its SQL text {text[:60]!r} cannot be parsed"
            else:
                yield from _facts_reasons(facts, allow_time, rules)


def _facts_reasons(
    facts: SqlFacts, allow_time: bool, rules: FunctionRules | None
) -> Iterator[tuple[int, str]]:
    if not facts.understood:
        yield _UNPARSED, "its SQL cannot be parsed (or is not a single statement)"
        return
    if facts.writes or facts.writes_unknown:
        names = ", ".join(sorted(facts.writes)) or "tables it does not name"
        yield _WRITES, f"it writes {names}: use the write path"
    if facts.locking:
        yield _LOCKS, f"it is a locking read ({facts.locking})"
    for name in sorted(facts.functions):
        reason = _call_reason(name, allow_time, rules)
        if reason is not None:
            yield reason
    if facts.time_literal and not allow_time:
        yield _TIME, "it compares with the current time ('now', 'today'...); opt in with allow_time"


def _call_reason(
    name: str, allow_time: bool, rules: FunctionRules | None
) -> tuple[int, str] | None:
    kind = classify(name, rules)
    if kind == "deterministic" or (kind == "time" and allow_time):
        return None
    if kind == "time":
        return _TIME, f"it calls {name}(), which depends on the time; opt in with allow_time"
    if kind == "volatile":
        return _VOLATILE, f"it calls {name}(), which is not deterministic"
    if kind == "writes":
        return _WRITES, f"it calls {name}(), which writes: use the write path"
    return _MAY_WRITE, (
        f"it calls {name}(), which is not on the deterministic allowlist and may write; "
        "declare it with FunctionRules"
    )


def _call_writes(name: str, rules: FunctionRules | None) -> set[str]:
    kind = classify(name, rules)
    if kind == "unknown":
        return {NAMESPACE_TAG}
    if kind == "writes" and rules is not None:
        return {tag for t in rules.writes[name] for tag in (f"t:{t}", f"a:{t}")}
    return set()


def _elements(stmt: Any) -> Iterator[Any]:
    """Every element of the statement, and the column expressions of the entities it
    loads (a ``column_property`` is not part of the statement object until compiled)."""
    yield from visitors.iterate(stmt)
    if not isinstance(stmt, Select):
        return
    for desc in stmt.column_descriptions:
        entity = desc.get("entity")
        mapper = inspect(entity, raiseerr=False) if entity is not None else None
        if isinstance(mapper, Mapper):
            for prop in mapper.column_attrs:
                for column in prop.columns:
                    yield from visitors.iterate(column)


def _function_name(fn: FunctionElement[Any]) -> str:
    name = str(getattr(fn, "name", type(fn).__name__)).lower()
    packages = getattr(fn, "packagenames", ()) or ()
    return ".".join([*(p.lower() for p in packages), name])


def _fragment(el: Any) -> str | None:
    """The SQL of a text fragment: ``text()``, or ``literal_column()``."""
    if isinstance(el, TextClause):
        return el.text
    if isinstance(el, ColumnClause) and el.is_literal:
        return el.name
    return None


def _describe_lock(lock: Any) -> str:
    words = ["FOR SHARE" if lock.read else "FOR UPDATE"]
    if lock.nowait:
        words.append("NOWAIT")
    if lock.skip_locked:
        words.append("SKIP LOCKED")
    if lock.of:
        words.append("OF …")
    return " ".join(words)
