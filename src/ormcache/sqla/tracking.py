"""Event wiring: what attached sessions and engines read and write, and when they commit.

Every listener is a bound method, registered by ``attach()`` and removed by ``detach()``;
attaching the same target twice is a no-op. The wiring does no analysis itself: it asks
``analysis`` which tags a statement reads or writes, and hands the answers on.

**Writes** are seen at one point every path crosses: the cursor events of every engine an
attached session binds to (an attached sessionmaker covers its engines without a second
``attach``). ORM unit of work, ORM and Core DML, bulk APIs, ``text()`` and driver SQL all
arrive there. A flush also reports its rows precisely (partition tags, old values of
changed rows); what a flush sends that its own analysis does not cover (association rows,
rows written by flush hooks) is tagged by table. Each write goes into the transaction
record of its connection (or session), whose write lease brackets COMMIT:

* before COMMIT: lease (which bumps) every tag the transaction wrote;
* after COMMIT (or rollback): bump again and release, before ``commit()`` returns.

A reader whose snapshot predates the lease fails its compare-and-set; one that falls
inside the lease gets no snapshot and stores nothing; one after the release sees the
committed data. Until then this context's reads of the written tables bypass the cache,
so a transaction sees its own writes and nothing uncommitted is ever stored. On an
AUTOCOMMIT connection each write commits as it runs, so each is leased and released
around its own execution.

**Reads** inside a memoized computation are recorded from the statement actually sent
(eager loads, ``column_property`` subqueries and loader criteria included), with the
parameter values of that execution. A statement that reads an older transaction snapshot
(REPEATABLE READ or SERIALIZABLE after the transaction's first statement), or that runs
on an engine this cache does not watch, makes the computation unstorable.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, Engine, Result
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, scoped_session, sessionmaker

from ormcache.errors import ConfigurationError
from ormcache.protocol import NAMESPACE_TAG, active_reads

from . import fromcache
from .analysis import flush_write_tags
from .catalog import dependent_writes
from .engines import EngineWatch
from .records import TxRecord, flushing

if TYPE_CHECKING:
    from ormcache.core import Core
    from ormcache.readpath import ReadPath

__all__ = ["Wiring", "sync_target"]

logger = logging.getLogger("ormcache")


# -- load tracking ------------------------------------------------------------------
# Process-wide and shared by every cache: a load is noted in whichever computations are
# active in this context, so a value built from identity-map objects is recognised.
_load_listeners_installed = False
_load_lock = threading.Lock()


def _on_load(target: object, *_: object) -> None:
    contexts = active_reads()
    if contexts:
        state = inspect(target)
        for ctx in contexts:
            ctx.loaded.add(state)


def install_load_listeners() -> None:
    global _load_listeners_installed
    with _load_lock:
        if _load_listeners_installed:
            return
        for name in ("load", "refresh", "refresh_flush"):
            event.listen(Mapper, name, _on_load)
        _load_listeners_installed = True


# -- mistakes are loud -----------------------------------------------------------------
# Process-wide too: a read that no attached session or engine sees cannot be invalidated
# by commits, so a computation that makes one is not stored, and the mistake is named.
_global_installed = False
# Keyed weakly, not by id(): an id is reused once its object is gone, and a new session
# class or engine must still get its warning.
_warned: weakref.WeakKeyDictionary[object, weakref.WeakSet[object]] = weakref.WeakKeyDictionary()


class _Marker:
    """A weakly referable stand-in for "no cache" in :func:`_warn_once`."""


_UNATTACHED_FROMCACHE = _Marker()


def _on_any_cursor(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
    contexts = active_reads()
    if not contexts:
        return
    engine = conn.engine
    for ctx in contexts:
        watching = getattr(ctx.owner, "watching", None)
        if watching is None or watching(engine):
            continue
        ctx.forbid("it read through an engine this cache is not attached to")
        _warn_once(
            engine,
            ctx.owner,
            "ormcache: a memoized function read through %r, which this cache is not "
            "attached to, so commits cannot invalidate what it read and its result is "
            "not cached; call cache.attach() with that Session, sessionmaker or Engine",
            engine,
        )


def _on_any_orm_execute(state: ORMExecuteState) -> None:
    # Runs for every ORM statement of the process: the common case (no FromCache
    # option) must cost almost nothing.
    for opt in getattr(state.statement, "_with_options", ()):
        if isinstance(opt, fromcache.FromCache):
            break
    else:
        return
    for fn in state.session.dispatch.do_orm_execute:
        if isinstance(getattr(fn, "__self__", None), SessionTracker):
            return
    _warn_once(
        type(state.session),
        _UNATTACHED_FROMCACHE,
        "ormcache: FromCache on a session no cache is attached to (%s): the statement runs "
        "uncached; call cache.attach() with its sessionmaker, scoped_session or Session "
        "class",
        type(state.session).__name__,
    )


def _warn_once(subject: object, about: object, message: str, *args: object) -> None:
    """Warn once per (subject, about) pair while both are alive."""
    seen = _warned.get(subject)
    if seen is None:
        seen = _warned[subject] = weakref.WeakSet()
    if about in seen:
        return
    seen.add(about)
    logger.warning(message, *args)


def install_global_listeners() -> None:
    """Listeners on every Engine and Session, once per process (see above)."""
    global _global_installed
    with _load_lock:
        if _global_installed:
            return
        event.listen(Engine, "before_cursor_execute", _on_any_cursor)
        event.listen(Session, "do_orm_execute", _on_any_orm_execute)
        _global_installed = True


class SessionTracker:
    """A Session class, sessionmaker or scoped_session: flushes, FromCache, commits."""

    _EVENTS = (
        "before_flush",
        "after_flush",
        "after_flush_postexec",
        "after_begin",
        "do_orm_execute",
        "before_commit",
        "after_commit",
        "after_soft_rollback",
        "after_transaction_end",
    )

    def __init__(self, wiring: Wiring, target: Any) -> None:
        self.wiring = wiring
        self.core = wiring.core
        self.target = target
        self.info_key = ("ormcache.tx", id(self))
        self._listeners: list[tuple[Any, str, Any]] = []
        self._flush_tokens: dict[int, contextvars.Token[list[set[str]] | None]] = {}

    def install(self) -> None:
        for name in self._EVENTS:
            fn = getattr(self, name)
            event.listen(self.target, name, fn)
            self._listeners.append((self.target, name, fn))
        for engine in _bound_engines(self.target):
            self.wiring.watch(engine, self)

    def remove(self) -> None:
        for target, name, fn in reversed(self._listeners):
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
        self._listeners.clear()

    def record(self, session: Session) -> TxRecord:
        tx = session.info.get(self.info_key)
        if tx is None:
            tx = session.info[self.info_key] = TxRecord()
        return tx

    # -- writes ------------------------------------------------------------------------
    def before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        self._flush_tokens[id(session)] = flushing.set([])

    def after_flush(self, session: Session, flush_context: Any) -> None:
        tags = flush_write_tags(session, self.core.codec.hash_salt)
        sent = flushing.get() or []
        covered = {t.split(":", 2)[1] for t in tags if t.startswith("t:")}
        for written in sent:
            # What the flush sent beyond the rows it reports (association rows, rows
            # written by flush hooks): tagged by table.
            if (
                NAMESPACE_TAG in written
                or not {t.split(":", 2)[1] for t in written if t.startswith("t:")} <= covered
            ):
                tags |= written
        if tags:
            bind = session.get_bind() if session.bind is not None else None
            self.record(session).add(self.core, dependent_writes(bind, tags, self.core.declared))

    def after_flush_postexec(self, session: Session, flush_context: Any) -> None:
        token = self._flush_tokens.pop(id(session), None)
        if token is not None:
            try:
                flushing.reset(token)
            except ValueError:  # pragma: no cover - reset from another context
                flushing.set(None)

    def after_begin(self, session: Session, transaction: Any, connection: Connection) -> None:
        self.wiring.watch(connection.engine, self)

    # -- reads -------------------------------------------------------------------------
    def do_orm_execute(self, state: ORMExecuteState) -> Result[Any] | None:
        if not state.is_select:
            return None
        option = fromcache.from_cache_option(state)
        core = self.core
        if option is None or (option.cache is not None and option.cache is not core.owner):
            return None
        fresh = self._fresh(state)
        return fromcache.execute(core, self.wiring.reads, state, option, fresh)

    def _fresh(self, state: ORMExecuteState) -> bool:
        session = state.session
        tx = session.get_transaction()
        if tx is None:
            return True
        bind: Any = session.get_bind(**state.bind_arguments)
        try:
            entry = tx._connections.get(bind)
        except AttributeError:  # pragma: no cover - future SQLAlchemy
            return bool(bind.dialect.name == "sqlite")
        if entry is None:
            return True
        conn = entry[0]
        watch = self.wiring.watches.get(id(conn.engine))
        if watch is None:
            return bool(bind.dialect.name == "sqlite")
        return watch.fresh(conn)

    # -- commit ------------------------------------------------------------------------
    def before_commit(self, session: Session) -> None:
        if session.in_nested_transaction():
            return
        # Flush now so every tag of this transaction is known before the lease.
        session.flush()
        tx = session.info.get(self.info_key)
        if tx is None or not tx.written:
            return
        joined = [conn for conn, commits in _session_connections(session) if not commits]
        if joined:
            # The session is joined into an outer transaction that it does not commit:
            # its writes commit (or roll back) with that transaction, whose connection
            # record carries them from here.
            for conn in joined:
                watch = self.wiring.watches.get(id(conn.engine))
                if watch is not None:
                    watch.state(conn.info).record.add(self.core, set(tx.written))
            return
        tx.lease(self.core)

    def after_commit(self, session: Session) -> None:
        if session.in_nested_transaction():
            return
        self._finish(session)
        # The connections this session committed: their records are done too (a
        # connection the application lent the session may never return to the pool).
        for conn, commits in _session_connections(session):
            watch = self.wiring.watches.get(id(conn.engine))
            st = None if watch is None else conn.info.get(watch.key)
            if commits and st is not None:
                st.record.finish(self.core)

    def after_soft_rollback(self, session: Session, previous_transaction: Any) -> None:
        if previous_transaction.parent is None:
            self._finish(session)

    def after_transaction_end(self, session: Session, transaction: Any) -> None:
        # Also covers close() without commit or rollback: pending tags must not leak.
        if transaction.parent is None:
            self._finish(session)

    def _finish(self, session: Session) -> None:
        tx = session.info.pop(self.info_key, None)
        if tx is not None:
            tx.finish(self.core)


def _session_connections(session: Session) -> list[tuple[Connection, bool]]:
    """The connections of the session's transaction, each with whether the session
    commits it (False: joined into an outer transaction the application owns)."""
    tx = session.get_transaction()
    if tx is None:
        return []
    try:
        entries = set(tx._connections.values())
    except AttributeError:  # pragma: no cover - future SQLAlchemy
        return []
    return [(conn, bool(should_commit)) for conn, _trans, should_commit, _ in entries]


def _bound_engines(target: Any) -> list[Engine]:
    """Engines a sessionmaker or scoped_session is configured with, where known now."""
    if isinstance(target, scoped_session):
        target = target.session_factory
    kw = getattr(target, "kw", None) or {}
    found = [kw.get("bind"), *(kw.get("binds") or {}).values()]
    engines: list[Engine] = []
    for bind in found:
        engine = getattr(bind, "engine", None)
        if isinstance(engine, Engine):
            engines.append(engine)
    return engines


class Wiring:
    """All listeners of one cache: attach and detach them by target."""

    def __init__(self, core: Core, reads: ReadPath) -> None:
        self.core = core
        self.reads = reads
        self.targets: dict[int, tuple[object, SessionTracker | None]] = {}
        self.watches: dict[int, EngineWatch] = {}
        self._lock = threading.Lock()

    def attach(self, target: object) -> bool:
        """Install listeners for ``target``; False if it was attached already."""
        sync = sync_target(target)
        with self._lock:
            if id(sync) in self.targets:
                return False
            install_load_listeners()
            if isinstance(sync, Engine):
                self.targets[id(sync)] = (sync, None)
                self.watch(sync, sync)
            elif isinstance(sync, (sessionmaker, scoped_session)) or (
                isinstance(sync, type) and issubclass(sync, Session)
            ):
                tracker = SessionTracker(self, sync)
                self.targets[id(sync)] = (sync, tracker)
                tracker.install()
            else:
                raise ConfigurationError(
                    "cache.attach() takes a Session class, sessionmaker, scoped_session or "
                    f"Engine, or their asyncio counterparts, got {target!r}"
                )
        return True

    def detach(self, target: object) -> None:
        sync = sync_target(target)
        with self._lock:
            found = self.targets.pop(id(sync), None)
            if found is None:
                return
            owner, tracker = found
            if tracker is not None:
                tracker.remove()
            for key, watch in list(self.watches.items()):
                watch.owners.discard(id(tracker if tracker is not None else owner))
                if not watch.owners:
                    watch.remove()
                    del self.watches[key]

    def detach_all(self) -> None:
        """Remove every listener of this cache (``Cache.close()``)."""
        for owner, _tracker in list(self.targets.values()):
            self.detach(owner)
        with self._lock:
            for watch in self.watches.values():
                watch.remove()
            self.watches.clear()

    def watch(self, engine: Engine, owner: object) -> EngineWatch:
        """The cursor-level listeners on ``engine``, installed once per cache."""
        watch = self.watches.get(id(engine))
        if watch is None or watch.engine is not engine:
            watch = EngineWatch(self, engine)
            watch.install(engine)
            self.watches[id(engine)] = watch
        watch.owners.add(id(owner))
        return watch

    def forget(self, watch: EngineWatch) -> None:
        """Drop the watch of an engine that was garbage-collected (no lock: this runs
        from the collector, possibly inside ``attach``'s own critical section)."""
        if self.watches.get(watch.engine_id) is watch:
            self.watches.pop(watch.engine_id, None)

    @property
    def attached(self) -> bool:
        return bool(self.targets)

    def watching(self, engine: Engine) -> bool:
        """Whether this cache sees the reads and writes of ``engine``."""
        watch = self.watches.get(id(engine))
        return watch is not None and watch.engine is engine

    def preloaded(self, call: Any) -> str | None:
        """Why a memoized call may compute from objects loaded before it started, or None.

        Instances already in a session's identity map when the call starts (a
        ``scoped_session`` the application reuses, a session passed as an argument) can
        be older than any generation the call reads: ``session.get()`` and attribute
        access serve them without a query. A call that then runs no query of its own has
        nothing tying its value to a generation, so it is returned but not stored; a call
        whose value comes from its own queries is stored as usual.
        """
        sessions: list[Session] = []
        for owner, _tracker in self.targets.values():
            if isinstance(owner, scoped_session) and owner.registry.has():
                sessions.append(owner())
        if isinstance(call, tuple) and len(call) == 2:
            args, kwargs = call
            for value in (*args, *kwargs.values()):
                if isinstance(value, Session):
                    sessions.append(value)
                elif isinstance(value, scoped_session) and value.registry.has():
                    sessions.append(value())
        for session in sessions:
            if any(state.key is not None for state in session.identity_map.all_states()):
                return (
                    "it ran no query, and its session held instances loaded before the "
                    "call, which it may have used; call it with a fresh session to cache it"
                )
        return None


def sync_target(target: object) -> object:
    """The sync object behind an asyncio one: SQLAlchemy runs an AsyncSession's ORM work
    on a sync Session (in a greenlet), so that is where the hooks go. A sessionmaker's
    or AsyncSession class's sync class is replaced by a subclass of its own, once, so only
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
        if "_ormcache_tracked" in vars(base):
            return base
        tracked = type(f"Tracked{base.__name__}", (base,), {"_ormcache_tracked": True})
        target.kw["sync_session_class"] = tracked
        return tracked
    if isinstance(target, type) and issubclass(target, AsyncSession):
        base = target.sync_session_class
        if "_ormcache_tracked" in vars(base):
            return base
        tracked = type(f"Tracked{base.__name__}", (base,), {"_ormcache_tracked": True})
        target.sync_session_class = tracked
        return tracked
    return target
