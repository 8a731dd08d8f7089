"""SQLAlchemy integration: what a session reads and writes, turned into tags.

Reads: every statement executed inside a memoized computation records a snapshot of its
tags *before* it runs (``do_orm_execute``), and instances loaded meanwhile are noted so a
result built from older identity-map objects is not stored.

Writes: flushes, ORM bulk DML, Core DML and ``text()`` DML add tags to the transaction.
Before COMMIT the session takes a write lease on them (which bumps them), and after COMMIT
it bumps them again and releases, all before ``commit()`` returns.
"""

from __future__ import annotations

import functools
import threading
import uuid
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event, inspect
from sqlalchemy.engine import Connection, Engine, Result
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import (
    Mapper,
    ORMExecuteState,
    Session,
    UserDefinedOption,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.sql import Delete, Insert, Select, Update
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.schema import Column
from sqlalchemy.util import immutabledict

from .errors import ConfigurationError, CorruptPayloadError, UncacheableValueError
from .keys import hash_bytes
from .protocol import (
    NAMESPACE_TAG,
    active_reads,
    begin_call,
    end_call,
    pending_write_tags,
    set_pending_write_tags,
)
from .sqla.analysis import (
    dml_write_tags,
    flush_write_tags,
    read_structure,
    statement_read_tags,
    text_is_read,
    text_write_tags,
)
from .sqla.tags import any_partition_tag, partition_tag, table_tag

if TYPE_CHECKING:
    from .cache import Cache

__all__ = ["FromCache", "SessionAdopter", "attach", "statement_read_tags"]

_INFO_KEY = "ormcache.tx"


def _record_read(cache: Cache, tags: set[str] | None, what: str) -> None:
    contexts = active_reads(cache)
    if not contexts:
        return
    if tags is None:
        for ctx in contexts:
            ctx.forbid(f"{what} reads tables ormcache cannot determine")
        return
    snap = cache.guard.snapshot(sorted(tags | {NAMESPACE_TAG}))
    for ctx in contexts:
        ctx.record(snap, what)


# -- load tracking ------------------------------------------------------------------
_load_listeners_installed = False
_load_lock = threading.Lock()


def _on_load(target: object, *_: object) -> None:
    contexts = active_reads()
    if contexts:
        state = inspect(target)
        for ctx in contexts:
            ctx.loaded.add(state)


def _install_load_listeners() -> None:
    global _load_listeners_installed
    with _load_lock:
        if _load_listeners_installed:
            return
        for name in ("load", "refresh", "refresh_flush"):
            event.listen(Mapper, name, _on_load)
        _load_listeners_installed = True


# -- writes -------------------------------------------------------------------------
class _Tx:
    """Per-session transaction bookkeeping: tags written, and the lease if taken."""

    __slots__ = ("lease_tags", "statements", "token", "written")

    def __init__(self) -> None:
        self.statements = 0
        self.written: set[str] = set()
        self.token: str | None = None
        self.lease_tags: set[str] = set()

    def lease(self, cache: Cache) -> None:
        """Before COMMIT: lease (which bumps) everything written so far, once."""
        if self.written and self.token is None:
            self.token = uuid.uuid4().hex
            self.lease_tags = set(self.written)
            cache.guard.acquire_lease(sorted(self.lease_tags), self.token, cache.lease_ttl)

    def release(self, cache: Cache) -> None:
        """After COMMIT (or rollback): bump again and drop the lease, if one was taken."""
        if self.token is not None:
            cache.guard.release_lease(sorted(self.lease_tags), self.token)


def _tx_in(info: dict[Any, Any]) -> _Tx:
    """The transaction record kept in a Session's or a Connection's ``info``."""
    tx = info.get(_INFO_KEY)
    if tx is None:
        tx = info[_INFO_KEY] = _Tx()
    return tx


def _tx(session: Session) -> _Tx:
    return _tx_in(session.info)


def _publish_pending(session: Session, tags: set[str]) -> None:
    """Make this context's reads of ``tags`` bypass the cache until the transaction ends."""
    set_pending_write_tags(id(session), frozenset(tags))


def _withdraw_pending(session: Session) -> None:
    set_pending_write_tags(id(session), frozenset())


def _attach_session(cache: Cache, target: Any) -> None:
    def written(session: Session, tags: set[str]) -> None:
        if not tags:
            return
        tx = _tx(session)
        new = tags - tx.written
        tx.written |= tags
        _publish_pending(session, tx.written)
        # A flush after the lease was taken (commit's own flush loop) must be leased too.
        if tx.token is not None and new:
            cache.guard.acquire_lease(sorted(new), tx.token, cache.lease_ttl)
            tx.lease_tags |= new

    @event.listens_for(target, "after_flush")
    def after_flush(session: Session, flush_context: Any) -> None:
        written(session, flush_write_tags(session, cache.codec.hash_salt))
        _tx(session).statements += 1

    @event.listens_for(target, "after_begin")
    def after_begin(session: Session, transaction: Any, connection: Connection) -> None:
        if transaction.parent is None:
            _tx(session).statements = 0

    @event.listens_for(target, "do_orm_execute")
    def do_orm_execute(state: ORMExecuteState) -> Result[Any] | None:
        stmt = state.statement
        if state.is_select:
            option = _from_cache_option(state)
            if option is not None and (option.cache is None or option.cache is cache):
                return _execute_from_cache(cache, state, option)
            if active_reads(cache):
                bind = state.session.get_bind(**state.bind_arguments)
                tags = statement_read_tags(
                    stmt, _params(state), cache.codec.hash_salt, str(bind.dialect.name)
                )
                if not _snapshot_is_fresh(state, bind):
                    for ctx in active_reads(cache):
                        ctx.forbid("a query read an older REPEATABLE READ snapshot")
                _record_read(cache, tags, "a query")
                _tx(state.session).statements += 1
            return None
        if state.is_insert or state.is_update or state.is_delete:
            written(state.session, dml_write_tags(stmt))
        elif isinstance(stmt, TextClause):
            if text_is_read(stmt.text):
                if active_reads(cache):
                    _record_read(cache, statement_read_tags(stmt), "a text() query")
            else:
                written(state.session, text_write_tags(stmt.text))
        return None

    @event.listens_for(target, "before_commit")
    def before_commit(session: Session) -> None:
        if session.in_nested_transaction():
            return
        # Flush now so every tag of this transaction is known before the lease.
        session.flush()
        _tx(session).lease(cache)

    @event.listens_for(target, "after_commit")
    def after_commit(session: Session) -> None:
        if session.in_nested_transaction():
            return
        _finish(session)

    @event.listens_for(target, "after_soft_rollback")
    def after_soft_rollback(session: Session, previous_transaction: Any) -> None:
        if previous_transaction.parent is None:
            _finish(session)

    @event.listens_for(target, "after_transaction_end")
    def after_transaction_end(session: Session, transaction: Any) -> None:
        # Also covers close() without commit or rollback: pending tags must not leak.
        if transaction.parent is None:
            _finish(session)

    def _finish(session: Session) -> None:
        tx = session.info.pop(_INFO_KEY, None)
        if tx is None:
            return
        _withdraw_pending(session)
        tx.release(cache)


def _attach_engine(cache: Cache, engine: Engine) -> None:
    """Core-only applications: track DML on connections of this engine.

    There is no event after COMMIT on a Core connection, so the lease (with its bump) is
    taken before COMMIT and released when the connection next begins or returns to the
    pool; until then the leased tags are read through, never served stale.
    """

    def release(info: dict[Any, Any]) -> None:
        tx = info.pop(_INFO_KEY, None)
        if tx is not None:
            tx.release(cache)

    @event.listens_for(engine, "before_execute")
    def before_execute(
        conn: Connection, clauseelement: Any, multiparams: Any, params: Any, options: Any
    ) -> None:
        if isinstance(clauseelement, (Insert, Update, Delete)):
            tags = dml_write_tags(clauseelement)
        elif isinstance(clauseelement, TextClause) and not text_is_read(clauseelement.text):
            tags = text_write_tags(clauseelement.text)
        else:
            if active_reads(cache) and isinstance(clauseelement, (Select, TextClause)):
                _record_read(
                    cache,
                    statement_read_tags(
                        clauseelement, params or None, cache.codec.hash_salt, conn.dialect.name
                    ),
                    "a query",
                )
            return
        _tx_in(conn.info).written |= tags

    @event.listens_for(engine, "commit")
    def commit(conn: Connection) -> None:
        tx = conn.info.get(_INFO_KEY)
        if tx is not None:
            tx.lease(cache)

    @event.listens_for(engine, "rollback")
    def rollback(conn: Connection) -> None:
        release(conn.info)

    @event.listens_for(engine, "begin")
    def begin(conn: Connection) -> None:
        release(conn.info)

    @event.listens_for(engine.pool, "checkin")
    def checkin(dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            release(record.info)


def _sync_target(target: object) -> object:
    """The sync object behind an asyncio one: SQLAlchemy runs an AsyncSession's ORM work
    on a sync Session (in a greenlet), so that is where the hooks go. A sessionmaker's
    or AsyncSession class's sync class is replaced by a subclass of its own, so only
    sessions made there are tracked, as with a sync sessionmaker."""
    try:
        from sqlalchemy.ext.asyncio import (
            AsyncEngine,
            AsyncSession,
            async_scoped_session,
            async_sessionmaker,
        )
    except ImportError:  # pragma: no cover - depends on the SQLAlchemy build
        return target
    if isinstance(target, AsyncEngine):
        return target.sync_engine
    if isinstance(target, async_scoped_session):
        target = target.session_factory
    if isinstance(target, async_sessionmaker):
        base = target.kw.get("sync_session_class") or Session
        tracked = type(f"Tracked{base.__name__}", (base,), {})
        target.kw["sync_session_class"] = tracked
        return tracked
    if isinstance(target, type) and issubclass(target, AsyncSession):
        tracked = type(
            f"Tracked{target.sync_session_class.__name__}", (target.sync_session_class,), {}
        )
        target.sync_session_class = tracked
        return tracked
    return target


def attach(cache: Cache, target: object) -> None:
    _install_load_listeners()
    target = _sync_target(target)
    if isinstance(target, Engine):
        _attach_engine(cache, target)
    elif isinstance(target, (sessionmaker, scoped_session)) or (
        isinstance(target, type) and issubclass(target, Session)
    ):
        _attach_session(cache, target)
    else:
        raise ConfigurationError(
            "cache.attach() takes a Session class, sessionmaker, scoped_session or Engine, "
            f"or their asyncio counterparts, got {target!r}"
        )


# -- loading cached instances into a session -----------------------------------------
def _rows(rows: Any) -> list[tuple[Any, ...]]:
    if type(rows) is not list or not all(type(r) is tuple for r in rows):
        raise TypeError("cached rows")
    return rows


class SessionAdopter:
    """Decodes a hit straight into a session (``Codec.decode(into=...)``): FromCache's
    session, or the session a memoized function merges into. An identity the session
    holds is never built twice, and nothing is walked again afterwards."""

    __slots__ = ("identity_map", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.identity_map = session.identity_map

    def existing(self, key: tuple[Any, ...]) -> object | None:
        return self.identity_map.get(key)

    def register(self, state: Any, key: tuple[Any, ...], obj: object) -> None:
        _register(self.session, state, key, obj)


def _register(session: Session, state: Any, key: Any, obj: object) -> None:
    """Make a snapshot instance persistent in ``session`` exactly as a row load does.

    This is the ORM loader's own registration (``loading._instance``), a few attribute
    writes instead of ``session.add``'s cascade walk; ``session.add`` is the fallback
    should SQLAlchemy's internals change.
    """
    identity_map: Any = session.identity_map
    try:
        add_unpresent = identity_map._add_unpresent
        hash_key = session.hash_key
    except AttributeError:  # pragma: no cover - future SQLAlchemy
        session.add(obj)
        return
    state.identity_token = key[2]
    state.session_id = hash_key
    add_unpresent(state, key)


# -- FromCache ----------------------------------------------------------------------
class FromCache(UserDefinedOption):
    """Serve this SELECT from the cache: ``select(User).options(FromCache(ttl=60))``.

    A hit runs no SQL and puts the instances into the session as a database load would.
    Entries are tagged by what the statement reads, so commits that change it invalidate
    it. ``cache=`` picks a cache when several are attached to the same sessions.
    """

    _is_ormcache = True
    propagate_to_loaders = True

    def __init__(self, ttl: float | None = None, *, cache: Cache | None = None) -> None:
        if ttl is not None and ttl <= 0:
            raise ConfigurationError(f"FromCache ttl must be positive seconds, got {ttl!r}")
        super().__init__(None)
        self.ttl = ttl
        self.cache = cache

    def _gen_cache_key(self, anon_map: Any, bindparams: Any) -> tuple[Any, ...]:
        return ()


def _from_cache_option(state: ORMExecuteState) -> FromCache | None:
    for opt in state.user_defined_options:
        if isinstance(opt, FromCache):
            return opt
    return None


class _Plan:
    """Everything about a statement shape that does not depend on its values.

    Built once per shape and process (keyed by SQLAlchemy's own cache key), so the hit
    path neither compiles SQL nor walks the statement.
    """

    __slots__ = ("base", "partitions", "static", "tables")

    def __init__(
        self,
        base: str,
        static: frozenset[str],
        partitions: tuple[tuple[Table, Column[Any], int, str], ...],
        tables: frozenset[str],
    ) -> None:
        self.base = base
        self.static = static
        self.partitions = partitions
        self.tables = tables

    def tags(self, ck: Any, params: dict[str, Any], salt: bytes | None) -> set[str]:
        out = set(self.static)
        for table, column, pos, key in self.partitions:
            bind = ck.bindparams[pos]
            value = params[key] if key in params else bind.effective_value  # noqa: SIM401 - lazy
            tag = partition_tag(table, column, value, salt)
            out.add(tag if tag is not None else table_tag(table))
        return out


_plans: dict[Any, _Plan | None] = {}
_PLAN_LIMIT = 2048


_NO_PLAN = object()


def _plan(state: ORMExecuteState, stmt: Any, ck: Any, dialect: str) -> _Plan | None:
    # The same statement shape compiles, and compares strings, differently per database.
    plan_key = (dialect, ck.key)
    # One lookup, not "in" then "[]": another thread may clear the dict in between.
    found = _plans.get(plan_key, _NO_PLAN)
    if found is not _NO_PLAN:
        return found  # type: ignore[return-value]
    plan = _build_plan(state, stmt, ck)
    if len(_plans) >= _PLAN_LIMIT:
        _plans.clear()
    _plans[plan_key] = plan
    return plan


def _build_plan(state: ORMExecuteState, stmt: Any, ck: Any) -> _Plan | None:
    bind = state.session.get_bind(**state.bind_arguments)
    structure = read_structure(stmt, bind.dialect.name)
    if structure is None:
        return None
    tables, partition = structure
    parts = [bind.dialect.name, str(stmt.compile(dialect=bind.dialect))]
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
    return _Plan(base, frozenset(static), tuple(partitions), frozenset(t.fullname for t in tables))


def _snapshot_is_fresh(state: ORMExecuteState, bind: Any) -> bool:
    """False when this statement would read a transaction snapshot older than now.

    Under REPEATABLE READ or SERIALIZABLE the snapshot is fixed by the transaction's
    first statement, so only that statement's read is known to follow the generations
    read just before it. SQLite (pysqlite) runs reads outside a transaction.
    """
    tx = state.session.info.get(_INFO_KEY)
    if tx is None or tx.statements == 0:
        return True
    dialect = bind.dialect
    if dialect.name == "sqlite":
        return True
    level = state.execution_options.get("isolation_level")
    if level is None:
        level = (
            bind.get_execution_options().get("isolation_level")
            if hasattr(bind, "get_execution_options")
            else None
        )
    if level is None:
        level = getattr(dialect, "default_isolation_level", None)
    return str(level or "").upper() not in ("REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT")


def _params(state: ORMExecuteState) -> dict[str, Any]:
    params = state.parameters
    return dict(params) if isinstance(params, dict) else {}


def _tables_of(tags: Iterable[str]) -> set[str]:
    return {t.split(":", 2)[1] for t in tags if ":" in t}


def _execute_from_cache(cache: Cache, state: ORMExecuteState, option: FromCache) -> Result[Any]:
    token = begin_call()
    try:
        return _from_cache(cache, state, option)
    finally:
        end_call(token)


# Result metadata per column-key list: immutable, so every hit can share one.
_metadata: dict[tuple[str, ...], SimpleResultMetaData] = {}


def _hit_metadata(keys: list[str]) -> SimpleResultMetaData:
    k = tuple(keys)
    meta = _metadata.get(k)
    if meta is None:
        if len(_metadata) >= _PLAN_LIMIT:
            _metadata.clear()
        meta = _metadata[k] = SimpleResultMetaData(k)
    return meta


# id(engine) -> (weak ref to it, salt, database identity).
_databases: dict[int, tuple[Any, bytes | None, str]] = {}


def _database(bind: Any, salt: bytes | None) -> str:
    """Which database a bind reads, as a short hash that goes into every FromCache key.

    The same statement against two databases behind one cache (shards, a database per
    tenant, a test copy) must never share an entry. The URL without its password names
    the database, the user (row-level security) and the options; each in-memory SQLite
    database is its own engine's.
    """
    engine = getattr(bind, "engine", bind)
    found = _databases.get(id(engine))
    if found is not None and found[0]() is engine and found[1] is salt:
        return found[2]
    url = engine.url
    name = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        name += f"#{id(engine)}"
    ident = hash_bytes(name.encode(), salt)[:12]
    if len(_databases) >= _PLAN_LIMIT:
        _databases.clear()
    _databases[id(engine)] = (weakref.ref(engine), salt, ident)
    return ident


# id(statement) -> (weak ref to it, database identity, salt, plan, entry key). The weak ref proves
# the id still names the same statement; it never keeps one alive.
_stmt_keys: dict[int, tuple[Any, str, bytes | None, _Plan, str]] = {}


def _remember_key(stmt: Any, derived: tuple[str, bytes | None, _Plan, str]) -> None:
    try:
        ref = weakref.ref(stmt)
    except TypeError:  # pragma: no cover - every SQLAlchemy executable takes weak refs
        return
    if len(_stmt_keys) >= _PLAN_LIMIT:
        _stmt_keys.clear()
    _stmt_keys[id(stmt)] = (ref, *derived)


def _bypass(
    cache: Cache, state: ORMExecuteState, stmt: Any, params: dict[str, Any], dialect: str
) -> Result[Any]:
    cache.stats_counters.incr("bypasses")
    _record_read(
        cache, statement_read_tags(stmt, params, cache.codec.hash_salt, dialect), "a query"
    )
    return state.invoke_statement()


@functools.cache
def _legacy_attributes(single_entity: bool, filtered: bool) -> Any:
    return immutabledict({"is_single_entity": single_entity, "filtered": filtered})


def _from_cache(cache: Cache, state: ORMExecuteState, option: FromCache) -> Result[Any]:
    session = state.session
    stats = cache.stats_counters
    if session.autoflush and not session._is_clean():
        # The ORM autoflushes only after this hook; flush first so our own pending
        # writes are known, and bypass the cache for the tables they touch.
        session.flush()
    stmt: Any = state.statement
    params = _params(state)
    pending = pending_write_tags()
    bind: Any = session.get_bind(**state.bind_arguments)
    fresh = _snapshot_is_fresh(state, bind)
    tx = _tx(session)
    tx.statements += 1
    populate = state.load_options._populate_existing if state.is_orm_statement else False
    dialect = str(bind.dialect.name)
    salt = cache.codec.hash_salt
    database = _database(bind, salt)
    plan: _Plan | None = None
    key: str | None = None
    known = None if params else _stmt_keys.get(id(stmt))
    if known is not None and known[0]() is stmt and known[1] == database and known[2] is salt:
        # A statement built once and run again (a module-level constant): same shape,
        # same values, same key.
        plan, key = known[3], known[4]
    ck = stmt._generate_cache_key()  # memoized on a reused statement: no walk
    if plan is None and ck is not None:
        plan = _plan(state, stmt, ck, dialect)
    if (
        plan is None
        or populate
        or NAMESPACE_TAG in pending
        or (pending and _tables_of(pending) & plan.tables)
    ):
        return _bypass(cache, state, stmt, params, dialect)
    if key is None:
        try:
            flat = [b.effective_value for b in ck.bindparams]
            if params:
                flat.append("\x00params")
                for k in sorted(params):
                    flat.extend((k, params[k]))
            values = cache.codec.canonical(tuple(flat))
        except UncacheableValueError:
            stats.incr("bypasses")
            _record_read(cache, plan.tags(ck, params, salt), "a query")
            return state.invoke_statement()
        key = f"{plan.base}:{database}:{hash_bytes(values, salt)}"
        if not params:
            _remember_key(stmt, (database, salt, plan, key))
    # The tags matter only to a store and to an enclosing memoized call: a plain hit
    # is checked by the backend against the generations recorded with the entry.
    all_tags: list[str] | None = None

    snap = None
    reads = active_reads(cache)
    if reads:
        all_tags = sorted(plan.tags(ck, params, salt))
        snap = cache.guard.snapshot(all_tags)
        for ctx in reads:
            ctx.record(snap, "a cached query")
            if not fresh:
                ctx.forbid("a query read an older REPEATABLE READ snapshot")

    data = cache.guard.get(key) if fresh else None
    if data is not None:
        try:
            decoded: Any = cache.codec.decode(data, into=SessionAdopter(session))
            keys, rows, flags = decoded
            loaded: Any = _rows(rows)
            meta = _hit_metadata(keys)
        except (CorruptPayloadError, TypeError, ValueError):
            stats.incr("corrupt")
            cache.guard.delete([key])
        else:
            stats.incr("hits")
            for ctx in reads:
                ctx.loaded.update(
                    inspect(o) for row in loaded for o in row if hasattr(o, "_sa_instance_state")
                )
            hit_result: Any = IteratorResult(meta, iter(loaded))
            if flags:
                # What the legacy Query reads to apply scalars() / unique() itself (a
                # new result's attributes are empty: no merge needed).
                hit_result._attributes = _legacy_attributes(bool(flags[0]), bool(flags[1]))
            return hit_result  # type: ignore[no-any-return]
    stats.incr("misses")
    if snap is None and fresh:
        all_tags = sorted(plan.tags(ck, params, salt))
        snap = cache.guard.snapshot(all_tags)
    result = state.invoke_statement()
    frozen = result.freeze()
    if frozen._source_supports_scalars:
        rows_out = [(x,) for x in frozen.data]
    else:
        rows_out = [tuple(r) for r in frozen.data]
    if snap is not None and fresh and not pending_write_tags():
        try:
            attrs = result._attributes
            flags = [bool(attrs.get("is_single_entity")), bool(attrs.get("filtered"))]
            payload = cache.codec.encode([list(result.keys()), rows_out, flags])
        except UncacheableValueError as exc:
            stats.incr("uncacheable")
            cache.guard.log.warning("uncacheable", "ormcache: query result not cached: %s", exc)
        else:
            ttl = option.ttl if option.ttl is not None else cache.default_ttl
            cache.guard.store(key, payload, ttl, snap)
    return frozen()
