"""Writes the database makes on its own: foreign-key actions, triggers, rules, views and
routines.

A write to a parent table can write other tables without any statement naming them:
``ON DELETE CASCADE`` / ``SET NULL`` / ``SET DEFAULT`` and ``ON UPDATE CASCADE`` rewrite
child rows, triggers and PostgreSQL rules write whatever their code says, a write through
an updatable view writes its tables, and every view over a table changes with it.
:func:`dependent_writes` widens a set of write tags to every table such database-side
actions can reach, transitively (a cascaded delete fires the child's triggers too).

Where the knowledge comes from, in order of authority:

* **the application's declarations** (``cache.declare_writes``), for what no catalog
  shows: triggers the database user may not see, routines written in C, or writes to
  other databases;
* **the database's catalog** (PostgreSQL ``pg_constraint``, ``pg_trigger``, ``pg_rules``,
  ``pg_rewrite``, ``pg_proc``; MariaDB/MySQL ``information_schema``; SQLite
  ``sqlite_master`` and ``PRAGMA foreign_key_list``), since schemas are often made by
  migrations the models do not mirror;
* **the SQLAlchemy metadata** of the tables written so far (``ForeignKey(ondelete=...,
  onupdate=...)``), which stands alone where the catalog cannot be read.

The catalog is read once per engine, on the first write that needs it, on a connection
of its own (a fresh one from a copy of the engine's pool; SQLite, whose in-memory
databases exist on one connection only, uses the writing connection), never on the read
path. It is read again after DDL through the engine, and after ``_MAX_AGE`` seconds, so
a migration run elsewhere is seen within that time (restarting the application sees it
at once).

**When the catalog cannot be read** (a timeout, a lost connection), the failure is logged
and, until a read succeeds (retried every ``_RETRY`` seconds), every write on that engine
is a write to the whole namespace: what cannot be known is assumed to be everything. A
trigger whose code cannot be followed (dynamic SQL, a body that does not parse, a
language other than SQL and PL/pgSQL) makes writes to its table writes to the namespace.
Nothing here ever raises into the application.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import MetaData, Table
from sqlalchemy.engine import Connection, Engine

from ormcache.protocol import NAMESPACE_TAG

from .functions import DETERMINISTIC, TIME, VOLATILE, FunctionRules
from .reflection import Body, CatalogFacts, read_catalog

__all__ = [
    "Declarations",
    "catalog_rules",
    "ddl_running",
    "dependent_writes",
    "function_rules",
    "note_metadata",
]

logger = logging.getLogger("ormcache")

_MAX_AGE = 600.0
_RETRY = 30.0
_FK_ACTIONS = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})
_BUILTIN = DETERMINISTIC | TIME | VOLATILE


class Declarations:
    """What the application declares its database writes on its own (one per cache).

    ``tables``: table name -> tables a write to it also writes (its triggers).
    ``functions``: routine name (lower case) -> tables a call may write; an empty set
    declares a routine that writes nothing. Replaced, never mutated, so readers on other
    threads see one version or the next.
    """

    def __init__(self) -> None:
        self.tables: Mapping[str, frozenset[str]] = {}
        self.functions: Mapping[str, frozenset[str]] = {}
        self.rules = FunctionRules()

    def declare(self, source: str, writes: Iterable[str]) -> None:
        """``source`` is a table name, or a routine name ending in ``()``."""
        targets = frozenset(writes)
        if source.endswith("()"):
            name = source[:-2].strip().lower()
            functions = dict(self.functions)
            functions[name] = functions.get(name, frozenset()) | targets
            self.functions = functions
            self.rules = FunctionRules(writes=functions)
        else:
            tables = dict(self.tables)
            tables[source] = tables.get(source, frozenset()) | targets
            self.tables = tables


class _Graph:
    """One catalog reading, turned into edges between the names tags use."""

    def __init__(self, facts: CatalogFacts | None, failed: bool) -> None:
        self.failed = failed
        self.loaded = time.monotonic()
        self.writes: dict[str, set[str]] = {}
        self.bases: dict[str, set[str]] = {}
        self.unknown: set[str] = set()
        self.opaque_views: set[str] = set()
        self.rules = FunctionRules()
        if facts is None:
            return
        names = _Names(facts.default_schemas)
        for parent, children in facts.actions.items():
            self._edges(names(parent), {n for c in children for n in names(c)})
        for table, bodies in facts.triggers.items():
            body = _resolve(bodies, facts)
            if body.unknown:
                self.unknown |= names(table)
            else:
                self._edges(names(table), {n for w in body.writes for n in names(w)})
        for view, bases in facts.views.items():
            for base in bases:
                if base.endswith("*"):
                    self.opaque_views |= names(view)
                    continue
                self._edges(names(base), names(view))  # a view changes with its tables
                for n in names(view):
                    self.bases.setdefault(n, set()).update(names(base))
        self.rules = _function_rules(facts, names)

    def _edges(self, sources: set[str], targets: set[str]) -> None:
        for source in sources:
            self.writes.setdefault(source, set()).update(targets - {source})


class _Names:
    """A qualified catalog name -> the names a ``Table.fullname`` (and so a tag) may use
    for it: qualified always, bare too in a default schema. A bare name from a body is
    qualified with each default schema."""

    def __init__(self, defaults: frozenset[str]) -> None:
        self.defaults = defaults

    def __call__(self, name: str) -> set[str]:
        schema, _, bare = name.rpartition(".")
        if not schema:
            return {name} | {f"{s}.{name}" for s in self.defaults}
        return {name, bare} if schema in self.defaults else {name}


def _resolve(bodies: Iterable[Body], facts: CatalogFacts) -> Body:
    """The writes of ``bodies`` and of every routine they call, transitively."""
    writes: set[str] = set()
    unknown = False
    stack = list(bodies)
    seen: set[str] = set()
    while stack and not unknown:
        body = stack.pop()
        unknown = body.unknown
        writes |= body.writes
        for call in body.calls - seen:
            seen.add(call)
            routine = facts.routines.get(call)
            if routine is not None and routine.volatility == "v":
                stack.append(routine.body)
    return Body(frozenset(writes), unknown=unknown)


def _function_rules(facts: CatalogFacts, names: _Names) -> FunctionRules:
    deterministic: set[str] = set()
    read_only: set[str] = set()
    writes: dict[str, frozenset[str]] = {}
    for name, routine in facts.routines.items():
        if name in _BUILTIN:
            continue  # never let a same-named routine change what a built-in means
        if routine.volatility == "i":
            deterministic.add(name)
        elif routine.volatility == "s":
            read_only.add(name)  # PostgreSQL refuses writes in STABLE functions
        else:
            body = _resolve([routine.body], facts)
            if not body.unknown:
                writes[name] = frozenset(n for w in body.writes for n in names(w))
    return FunctionRules(frozenset(deterministic), frozenset(read_only), writes)


# -- metadata ------------------------------------------------------------------------
_metadata: weakref.WeakSet[MetaData] = weakref.WeakSet()
_metadata_edges: dict[str, set[str]] = {}
_metadata_lock = threading.Lock()


def note_metadata(metadata: MetaData | None) -> None:
    """Remember the foreign-key actions of a MetaData whose tables are being written."""
    if metadata is None or metadata in _metadata:
        return
    with _metadata_lock:
        _metadata.add(metadata)
        for table in list(metadata.tables.values()):
            _note_table(table)


def _note_table(table: Table) -> None:
    for fk in table.foreign_keys:
        actions = {str(fk.ondelete or "").upper(), str(fk.onupdate or "").upper()}
        if actions & _FK_ACTIONS:
            try:
                parent = fk.column.table
            except Exception as exc:  # an unresolvable reference: the catalog may know it
                logger.debug("ormcache: foreign key %s not resolved: %s", fk, exc)
                continue
            _metadata_edges.setdefault(parent.fullname, set()).add(table.fullname)


# -- per-engine catalog ------------------------------------------------------------------
class _EngineCatalog:
    __slots__ = ("graph", "lock", "merged", "stale")

    def __init__(self) -> None:
        self.graph: _Graph | None = None
        self.stale = False
        self.lock = threading.Lock()
        self.merged: tuple[Any, Any, FunctionRules] | None = None


_catalogs: weakref.WeakKeyDictionary[Engine, _EngineCatalog] = weakref.WeakKeyDictionary()
_catalogs_lock = threading.Lock()


def _entry(engine: Engine) -> _EngineCatalog:
    found = _catalogs.get(engine)
    if found is None:
        with _catalogs_lock:
            found = _catalogs.setdefault(engine, _EngineCatalog())
    return found


#: The engine whose DDL statement is about to run in this context, if any.
_ddl_now: contextvars.ContextVar[Engine | None] = contextvars.ContextVar(
    "ormcache_ddl_now", default=None
)


def ddl_running(bind: Any) -> None:
    """Called before every statement on a watched engine: ``bind`` is the engine when
    the statement is DDL (None otherwise). The engine's catalog is then stale, but is
    not read again until a later statement, once the DDL has run."""
    engine = getattr(bind, "engine", None)
    if isinstance(engine, Engine):
        _entry(engine).stale = True
        _ddl_now.set(engine)
    elif _ddl_now.get() is not None:
        _ddl_now.set(None)


def _graph(bind: Any, load: bool) -> _Graph | None:
    """The engine's catalog graph; read (or read again) only when ``load`` is True."""
    engine = getattr(bind, "engine", None)
    if not isinstance(engine, Engine):
        return None
    entry = _entry(engine)
    graph = entry.graph
    if graph is not None and not _expired(entry, graph):
        return graph
    if (
        not load
        or _ddl_now.get() is engine
        or (engine.dialect.name == "sqlite" and not isinstance(bind, Connection))
    ):
        # SQLite's catalog is read on the writing connection (an in-memory database
        # exists on that connection only): the cursor-level write that comes first.
        return graph
    with entry.lock:
        graph = entry.graph
        if graph is None or _expired(entry, graph):
            entry.stale = False
            graph = entry.graph = _read(bind, engine)
    return graph


def _expired(entry: _EngineCatalog, graph: _Graph) -> bool:
    age = time.monotonic() - graph.loaded
    return entry.stale or age > (_RETRY if graph.failed else _MAX_AGE)


def _read(bind: Any, engine: Engine) -> _Graph:
    dialect = engine.dialect.name
    try:
        if isinstance(bind, Connection) and dialect == "sqlite":
            return _Graph(read_catalog(bind.connection.dbapi_connection, dialect), False)
        with _borrowed(engine) as dbapi_connection:
            return _Graph(read_catalog(dbapi_connection, dialect), failed=False)
    except Exception as exc:
        logger.warning(
            "ormcache: could not read the %s catalog for foreign-key actions, triggers "
            "and routines (%s); until it can be read, every write on this engine "
            "invalidates the whole namespace",
            dialect,
            exc,
        )
        return _Graph(None, failed=True)


@contextlib.contextmanager
def _borrowed(engine: Engine) -> Iterator[Any]:
    """A DBAPI connection that is not the writing one: an idle one of the engine's pool
    if there is one (no new connection, which a busy server may refuse), else a fresh
    one from a copy of the pool (never wait for the pool: the writer may be holding its
    last connection). Used at the DBAPI level, so the catalog queries never pass through
    the cursor events that classify the application's statements."""
    pool = engine.pool
    idle = getattr(pool, "checkedin", None)
    if callable(idle) and idle() > 0:
        conn = pool.connect()
        try:
            yield conn.dbapi_connection
        finally:
            conn.close()  # the pool's reset on return rolls the catalog reads back
        return
    spare = pool.recreate()
    try:
        conn = spare.connect()
        try:
            yield conn.dbapi_connection
        finally:
            conn.close()
    finally:
        spare.dispose()


# -- the two questions ---------------------------------------------------------------
def dependent_writes(bind: Any, tags: set[str], declared: Declarations | None = None) -> set[str]:
    """``tags`` plus the tags of every table the database itself may write as a
    consequence, transitively; ``NAMESPACE_TAG`` added when that cannot be known.

    ``bind`` is the Engine or Connection that wrote (None when unknown: then only the
    metadata and the declarations are consulted).
    """
    written = {t[2:] for t in tags if t.startswith(("t:", "a:"))}
    if not written or NAMESPACE_TAG in tags:
        return tags
    graph = _graph(bind, load=True) if bind is not None else None
    if graph is not None and graph.failed:
        return tags | {NAMESPACE_TAG}
    extra, namespace = _closure(written, graph, declared)
    if namespace:
        return tags | {NAMESPACE_TAG}
    if not extra:
        return tags
    return tags | {tag for name in extra for tag in (f"t:{name}", f"a:{name}")}


def _closure(
    written: set[str], graph: _Graph | None, declared: Declarations | None
) -> tuple[set[str], bool]:
    declared_tables = declared.tables if declared is not None else {}
    seen = set(written)
    stack = list(written)
    if graph is not None:
        # A write through a view writes the tables under it (auto-updatable views).
        for name in written:
            stack += graph.bases.get(name, ())
        if graph.opaque_views:
            stack += graph.opaque_views
    while stack:
        name = stack.pop()
        seen.add(name)
        if graph is not None and name in graph.unknown:
            return seen, True
        nexts: set[str] = set(declared_tables.get(name, ())) | _metadata_edges.get(name, set())
        if graph is not None:
            nexts |= graph.writes.get(name, set())
        stack += [n for n in nexts if n not in seen]
    return seen - written, False


def function_rules(bind: Any, declared: Declarations | None) -> FunctionRules:
    """What the catalog (read now if need be) and the declarations say of routines; the
    declarations win."""
    graph = _graph(bind, load=True)
    return _merge(bind, graph, declared)


def catalog_rules(bind: Any) -> FunctionRules | None:
    """What the catalog says of routines if it has been read already (never reads it:
    this is asked on the read path)."""
    graph = _graph(bind, load=False)
    return None if graph is None else graph.rules


def _merge(bind: Any, graph: _Graph | None, declared: Declarations | None) -> FunctionRules:
    base = graph.rules if graph is not None else FunctionRules()
    if declared is None or not declared.functions:
        return base
    engine = getattr(bind, "engine", None)
    entry = _entry(engine) if isinstance(engine, Engine) else None
    merged = entry.merged if entry is not None else None
    if merged is not None and merged[0] is base and merged[1] is declared.rules:
        return merged[2]
    own = declared.functions
    rules = FunctionRules(
        deterministic=base.deterministic - own.keys(),
        read_only=base.read_only - own.keys(),
        writes={**base.writes, **own},
    )
    if entry is not None:
        entry.merged = (base, declared.rules, rules)
    return rules
