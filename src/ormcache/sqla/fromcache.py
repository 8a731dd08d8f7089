"""``FromCache``: serve one SELECT from the cache, through the one read path.

This module only says what a statement's key and tags are and how to run it; the read
path (``ormcache.readpath``) decides whether to serve, computes, and stores. A statement
*shape* is analysed once per process and database (a :class:`_Plan`, keyed by
SQLAlchemy's own cache key), so a hit neither compiles SQL nor walks the statement.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table
from sqlalchemy.engine import Result
from sqlalchemy.orm import ORMExecuteState, UserDefinedOption
from sqlalchemy.sql.schema import Column

from ormcache.errors import ConfigurationError, UncacheableValueError
from ormcache.keys import hash_bytes
from ormcache.protocol import NAMESPACE_TAG

from .analysis import read_structure, uncacheable_reason
from .loading import SessionAdopter, hit_result, result_payload
from .tags import any_partition_tag, partition_tag, table_tag

if TYPE_CHECKING:
    from ormcache.core import Core
    from ormcache.readpath import ReadPath

__all__ = [
    "FromCache",
    "StatementRead",
    "database_identity",
    "execute",
    "from_cache_option",
    "plan_for",
]

_LIMIT = 2048


class FromCache(UserDefinedOption):
    """Serve this SELECT from the cache: ``select(User).options(FromCache(ttl=60))``.

    A hit runs no SQL and puts the instances into the session as a database load would.
    Entries are tagged by what the statement reads, so commits that change it invalidate
    it. ``cache=`` picks a cache when several are attached to the same sessions.

    Some statements are never served from the cache, whatever the option says: locking
    reads (``with_for_update()``), calls of functions that are not known to be
    deterministic (``random()``, sequences, ``current_user``, user-defined functions),
    and statements that write. Time functions (``now()``) are refused too unless
    ``allow_time=True`` says an answer ``ttl`` seconds old is acceptable.

    The option applies to the statement it is on; lazy loads of the instances it returns
    run as usual (an option that propagated would make them cached reads, and a lazy load
    inside a flush must never flush).
    """

    _is_ormcache = True
    propagate_to_loaders = False

    def __init__(
        self, ttl: float | None = None, *, cache: object | None = None, allow_time: bool = False
    ) -> None:
        if ttl is not None and ttl <= 0:
            raise ConfigurationError(f"FromCache ttl must be positive seconds, got {ttl!r}")
        super().__init__(None)
        self.ttl = ttl
        self.cache = cache
        #: Serve statements that call time functions (``now()``, ``current_date``...):
        #: an answer up to ``ttl`` seconds old is then acceptable to the caller.
        self.allow_time = allow_time

    def _gen_cache_key(self, anon_map: Any, bindparams: Any) -> tuple[Any, ...]:
        return ()


def from_cache_option(state: ORMExecuteState) -> FromCache | None:
    for opt in state.user_defined_options:
        if isinstance(opt, FromCache):
            return opt
    return None


class _Plan:
    """Everything about a statement shape that does not depend on its values."""

    __slots__ = ("base", "callables", "partitions", "reason", "static", "tables")

    def __init__(
        self,
        base: str,
        static: frozenset[str],
        partitions: tuple[tuple[Table, Column[Any], int, str], ...],
        tables: frozenset[str],
        reason: str | None = None,
        callables: bool = False,
    ) -> None:
        self.base = base
        self.static = static
        self.partitions = partitions
        self.tables = tables
        #: Why this shape is never served from the cache (the serve rule), or None.
        self.reason = reason
        #: Whether a bound value comes from a callable, resolved per execution.
        self.callables = callables

    def tags(self, ck: Any, params: dict[str, Any], salt: bytes | None) -> set[str]:
        out = set(self.static)
        for table, column, pos, key in self.partitions:
            bind = ck.bindparams[pos]
            value = params[key] if key in params else bind.effective_value  # noqa: SIM401 - lazy
            tag = partition_tag(table, column, value, salt)
            out.add(tag if tag is not None else table_tag(table))
        return out


_plans: dict[Any, _Plan | None] = {}
_NO_PLAN = object()


def plan_for(stmt: Any, ck: Any, dialect: Any, allow_time: bool = False) -> _Plan | None:
    """The plan of a statement shape on a database dialect, built once per process."""
    # The same statement shape compiles, and compares strings, differently per database.
    plan_key = (dialect.name, allow_time, ck.key)
    # One lookup, not "in" then "[]": another thread may clear the dict in between.
    found = _plans.get(plan_key, _NO_PLAN)
    if found is not _NO_PLAN:
        return found  # type: ignore[return-value]
    plan = _build_plan(stmt, ck, dialect, allow_time)
    if len(_plans) >= _LIMIT:
        _plans.clear()
    _plans[plan_key] = plan
    return plan


def _build_plan(stmt: Any, ck: Any, dialect: Any, allow_time: bool) -> _Plan | None:
    structure = read_structure(stmt, dialect.name)
    if structure is None:
        return None
    tables, partition = structure
    parts = [dialect.name, str(stmt.compile(dialect=dialect))]
    for opt in stmt._with_options:
        if isinstance(opt, FromCache):
            continue
        for el in getattr(opt, "context", ()):
            parts.append(
                repr(
                    (
                        type(el).__name__,
                        str(getattr(el, "path", "")),
                        getattr(el, "strategy", None),
                        sorted(getattr(el, "local_opts", {}).items()),
                    )
                )
            )
    base = "q:" + hash_bytes("\x00".join(parts).encode())[:20]
    static: set[str] = {NAMESPACE_TAG}
    partitions: list[tuple[Table, Column[Any], int, str]] = []
    for table in tables:
        term = partition.get(table)
        pos = -1
        if term is not None:
            pos = next((i for i, b in enumerate(ck.bindparams) if b is term[1]), -1)
        if term is None or pos < 0:
            static.add(table_tag(table))
        else:
            static.add(any_partition_tag(table))
            partitions.append((table, term[0], pos, term[1].key))
    return _Plan(
        base,
        frozenset(static),
        tuple(partitions),
        frozenset(t.fullname for t in tables),
        uncacheable_reason(stmt, dialect.name, allow_time=allow_time),
        any(b.callable is not None for b in ck.bindparams),
    )


def database_identity(bind: Any, salt: bytes | None) -> str:
    """Which database a bind reads, as a short hash that goes into every FromCache key.

    The same statement against two databases behind one cache (shards, a database per
    tenant, a test copy) must never share an entry. The URL without its password names
    the database, the user (row-level security) and the options; PostgreSQL's
    ``search_path`` (from ``connect_args`` or the role) is read once per engine. Each
    in-memory SQLite database gets an identity of its own that no later engine can
    reuse (``id()`` can be).
    """
    engine = getattr(bind, "engine", bind)
    found = getattr(engine, "_ormcache_database", None)
    if found is not None and found[0] is salt:
        return str(found[1])
    url = engine.url
    name = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        name += "#" + uuid.uuid4().hex
    elif url.get_backend_name() == "postgresql":
        name += "#search_path=" + _search_path(engine)
    ident = hash_bytes(name.encode(), salt)[:12]
    engine._ormcache_database = (salt, ident)
    return ident


def _search_path(engine: Any) -> str:
    """The search_path a new connection of ``engine`` gets (connect_args, role, database
    settings): an unqualified table name means a different table under another one."""
    try:
        # A DBAPI connection of the pool: no statement events, nothing to classify.
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SHOW search_path")
            row = cursor.fetchone()
            cursor.close()
            raw.rollback()
        finally:
            raw.close()
        return str(row[0] if row else "")
    except Exception:  # an unreachable database: the statement will fail on its own
        return "?" + uuid.uuid4().hex  # never shared


# id(statement) -> (weak ref to it, database identity, salt, plan, entry key). The weak ref
# proves the id still names the same statement; it never keeps one alive.
_stmt_keys: dict[int, tuple[Any, str, bytes | None, _Plan, str]] = {}


def _remember_key(stmt: Any, derived: tuple[str, bytes | None, _Plan, str]) -> None:
    try:
        ref = weakref.ref(stmt)
    except TypeError:  # pragma: no cover - every SQLAlchemy executable takes weak refs
        return
    if len(_stmt_keys) >= _LIMIT:
        _stmt_keys.clear()
    _stmt_keys[id(stmt)] = (ref, *derived)


class _Rows:
    """A FromCache value: the payload to store (on a miss) and the result to return."""

    __slots__ = ("payload", "result", "rows")

    def __init__(self, payload: Any, result: Callable[[], Result[Any]], rows: list[Any]) -> None:
        self.payload = payload
        self.result = result
        self.rows = rows


class StatementRead:
    """The recipe of one FromCache execution (see ``ormcache.readpath.Recipe``)."""

    name: str = "a cached query"
    negative_ttl: float | None = None
    stale_ttl: float | None = None
    early_refresh: float | None = None
    single_flight: bool = False
    tracked: bool = False

    __slots__ = ("_core", "_state", "allow_time", "ck", "params", "plan", "strict", "ttl")

    def __init__(
        self,
        core: Core,
        state: ORMExecuteState,
        option: FromCache,
        plan: _Plan | None,
        ck: Any,
        params: dict[str, Any],
    ) -> None:
        self._core = core
        self._state = state
        self.plan = plan
        self.ck = ck
        self.params = params
        self.ttl = option.ttl if option.ttl is not None else core.default_ttl
        self.strict = core.strict
        self.allow_time = option.allow_time

    def key(self, database: str, context: tuple[Any, ...] = ()) -> str | None:
        """The entry key, or None when a parameter value cannot be keyed.

        ``context`` holds what else changes the result (the schema translation map).
        """
        assert self.plan is not None
        stmt = self._state.statement
        params = self.params
        salt = self._core.codec.hash_salt
        # A statement built once and run again keeps its key, unless a value comes from
        # a callable (``bindparam(callable_=...)``) or the context changes the result.
        reusable = not params and not context and not self.plan.callables
        if reusable:
            known = _stmt_keys.get(id(stmt))
            # A statement built once and run again (a module-level constant): same
            # shape, same values, same key.
            if (
                known is not None
                and known[0]() is stmt
                and known[1] == database
                and known[2] is salt
                and known[3] is self.plan
            ):
                return known[4]
        try:
            flat = [b.effective_value for b in self.ck.bindparams]
            if context:
                flat.append("\x00context")
                flat.extend(context)
            if params:
                flat.append("\x00params")
                for k in sorted(params):
                    flat.extend((k, params[k]))
            values = self._core.codec.canonical(tuple(flat))
        except UncacheableValueError:
            return None
        key = f"{self.plan.base}:{database}:{hash_bytes(values, salt)}"
        if reusable:
            _remember_key(stmt, (database, salt, self.plan, key))
        return key

    def tags(self, call: object) -> Sequence[str] | None:
        if self.plan is None:
            return None
        return sorted(self.plan.tags(self.ck, self.params, self._core.codec.hash_salt))

    def tables(self, call: object) -> frozenset[str] | None:
        return None if self.plan is None else self.plan.tables

    def compute(self, call: object) -> _Rows:
        payload, frozen = result_payload(self._state.invoke_statement())
        return _Rows(payload, frozen, [])

    def encode(self, value: _Rows, on_instance: Callable[[object], None]) -> bytes:
        # Instances are reported: one the query returned from the identity map without
        # refreshing it may predate the snapshot, and is not stored (see readpath).
        return self._core.codec.encode(value.payload, on_instance=on_instance)

    def decode(self, data: bytes, call: object) -> _Rows:
        decoded = self._core.codec.decode(data, into=SessionAdopter(self._state.session))
        result, rows = hit_result(decoded)
        return _Rows(None, lambda: result, rows)

    def loaded(self, value: _Rows) -> Iterable[object]:
        from sqlalchemy import inspect

        return [inspect(o) for row in value.rows for o in row if hasattr(o, "_sa_instance_state")]


def _params(state: ORMExecuteState) -> dict[str, Any]:
    params = state.parameters
    return dict(params) if isinstance(params, dict) else {}


def execute(
    core: Core, reads: ReadPath, state: ORMExecuteState, option: FromCache, fresh: bool
) -> Result[Any]:
    """Run a FromCache statement through the read path (the ``do_orm_execute`` hook).

    ``fresh`` is False when the statement would read a transaction snapshot older than
    now (see ``tracking``): it is then neither served nor stored.
    """
    session = state.session
    # A read made while the session flushes (from a flush or mapper hook): never flush
    # inside the flush, and never serve or store it, since the flush's writes so far are
    # recorded for this transaction only when the flush ends.
    flushing = session._flushing
    if session.autoflush and not flushing and not session._is_clean():
        # The ORM autoflushes only after this hook; flush first so our own pending
        # writes are known, and bypass the cache for the tables they touch.
        session.flush()
    served = _run_later_hooks(state)
    if served is not None:
        return served
    stmt: Any = state.statement
    bind: Any = session.get_bind(**state.bind_arguments)
    ck = stmt._generate_cache_key()  # memoized on a reused statement: no walk
    plan = None if ck is None else plan_for(stmt, ck, bind.dialect, option.allow_time)
    read = StatementRead(core, state, option, plan, ck, _params(state))
    bypass: str | None = None
    key = ""
    if flushing:
        bypass = "the session is flushing"
    elif plan is None:
        bypass = "ormcache cannot determine every table it reads"
    elif plan.reason is not None:
        bypass = plan.reason
    elif state.is_orm_statement and state.load_options._populate_existing:
        bypass = "populate_existing() asks for a database read"
    else:
        found = read.key(database_identity(bind, core.codec.hash_salt), _context(state, bind))
        if found is None:
            bypass = "a parameter value cannot be part of a key"
        else:
            key = found
    rows: _Rows = reads.run(read, key, None, bypass, older_snapshot=not fresh)
    return rows.result()


def _context(state: ORMExecuteState, bind: Any) -> tuple[Any, ...]:
    """What else changes the result: the schema translation map (tenants by schema),
    from the execution options or the engine."""
    translate = state.execution_options.get("schema_translate_map")
    if translate is None and hasattr(bind, "get_execution_options"):
        translate = bind.get_execution_options().get("schema_translate_map")
    if not translate:
        return ()
    return ("schema_translate_map", *sorted((str(k), str(v)) for k, v in translate.items()))


def _run_later_hooks(state: ORMExecuteState) -> Result[Any] | None:
    """Run the ``do_orm_execute`` hooks registered after ormcache's, now.

    A hook that adds criteria (a tenant filter) changes what the statement returns, so
    the key and a hit must reflect it, whatever order the hooks were registered in. They
    run once, here, on the statement that ormcache then keys and serves; a result one of
    them returns wins, as it would have. The execution state then records that they
    ran, so that a miss's ``invoke_statement()`` does not run them again.
    """
    try:
        listeners = list(state.session.dispatch.do_orm_execute)
        start = state._starting_event_idx
    except AttributeError:  # pragma: no cover - future SQLAlchemy
        return None
    for idx in range(start + 1, len(listeners)):
        state._starting_event_idx = idx
        result = listeners[idx](state)
        if result:
            return result  # type: ignore[no-any-return]
    return None
