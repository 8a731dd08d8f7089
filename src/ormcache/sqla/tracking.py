"""Event wiring: what attached sessions and engines read and write, and when they commit.

Every listener is a bound method of a tracker, registered by ``attach()`` and removed by
``detach()``; attaching the same target twice is a no-op. A tracker does no analysis
itself: it asks ``analysis`` which tags a statement reads or writes, hands reads to the
read path, and feeds writes to the transaction record, whose write lease brackets COMMIT:

* before COMMIT: lease (which bumps) every tag the transaction wrote;
* after COMMIT (or rollback): bump again and release, before ``commit()`` returns.

A reader whose snapshot predates the lease fails its compare-and-set; one that falls
inside the lease gets no snapshot and stores nothing; one after the release sees the
committed data.
"""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, Engine, Result
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, scoped_session, sessionmaker
from sqlalchemy.sql import Delete, Insert, Select, Update
from sqlalchemy.sql.elements import TextClause

from ormcache.errors import ConfigurationError
from ormcache.protocol import NAMESPACE_TAG, active_reads, set_pending_write_tags

from . import fromcache
from .analysis import (
    dml_write_tags,
    flush_write_tags,
    statement_read_tags,
    text_is_read,
    text_write_tags,
)

if TYPE_CHECKING:
    from ormcache.core import Core
    from ormcache.readpath import ReadPath

__all__ = ["EngineTracker", "SessionTracker", "Tracker", "make_tracker", "sync_target"]


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


# -- transaction records ---------------------------------------------------------------
class TxRecord:
    """One transaction's bookkeeping for one cache: tags written, and the lease if taken."""

    __slots__ = ("lease_tags", "statements", "token", "written")

    def __init__(self) -> None:
        self.statements = 0
        self.written: set[str] = set()
        self.token: str | None = None
        self.lease_tags: set[str] = set()

    def lease(self, core: Core) -> None:
        """Before COMMIT: lease (which bumps) everything written so far, once."""
        if self.written and self.token is None:
            self.token = uuid.uuid4().hex
            self.lease_tags = set(self.written)
            core.guard.acquire_lease(sorted(self.lease_tags), self.token, core.lease_ttl)

    def release(self, core: Core) -> None:
        """After COMMIT (or rollback): bump again and drop the lease, if one was taken."""
        if self.token is not None:
            core.guard.release_lease(sorted(self.lease_tags), self.token)


def record_read(core: Core, tags: set[str] | None, what: str) -> None:
    """Note a plain (uncached) read in the computations of ``core`` that are running."""
    contexts = active_reads(core)
    if not contexts:
        return
    if tags is None:
        for ctx in contexts:
            ctx.forbid(f"{what} reads tables ormcache cannot determine")
        return
    snap = core.guard.snapshot(sorted(tags | {NAMESPACE_TAG}))
    for ctx in contexts:
        ctx.record(snap, what)


class Tracker:
    """Listeners of one cache on one target; ``detach()`` removes exactly these."""

    def __init__(self, core: Core, reads: ReadPath, target: Any) -> None:
        self.core = core
        self.reads = reads
        self.target = target
        # Per cache: two caches attached to one session each keep their own record.
        self.info_key = ("ormcache.tx", id(self))
        self._listeners: list[tuple[Any, str, Any]] = []

    def _listen(self, target: Any, name: str, fn: Any) -> None:
        event.listen(target, name, fn)
        self._listeners.append((target, name, fn))

    def attach(self) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        for target, name, fn in reversed(self._listeners):
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
        self._listeners.clear()

    def tx_in(self, info: dict[Any, Any]) -> TxRecord:
        """The transaction record kept in a Session's or a Connection's ``info``."""
        tx = info.get(self.info_key)
        if tx is None:
            tx = info[self.info_key] = TxRecord()
        return tx


class SessionTracker(Tracker):
    """A Session class, sessionmaker or scoped_session: ORM reads, writes and commits."""

    def attach(self) -> None:
        for name in (
            "after_flush",
            "after_begin",
            "do_orm_execute",
            "before_commit",
            "after_commit",
            "after_soft_rollback",
            "after_transaction_end",
        ):
            self._listen(self.target, name, getattr(self, name))

    def _written(self, session: Session, tags: set[str]) -> None:
        if not tags:
            return
        tx = self.tx_in(session.info)
        new = tags - tx.written
        tx.written |= tags
        # This context's reads of these tags bypass the cache until the transaction ends.
        set_pending_write_tags(id(session), frozenset(tx.written))
        # A flush after the lease was taken (commit's own flush loop) must be leased too.
        if tx.token is not None and new:
            self.core.guard.acquire_lease(sorted(new), tx.token, self.core.lease_ttl)
            tx.lease_tags |= new

    def after_flush(self, session: Session, flush_context: Any) -> None:
        self._written(session, flush_write_tags(session, self.core.codec.hash_salt))
        self.tx_in(session.info).statements += 1

    def after_begin(self, session: Session, transaction: Any, connection: Connection) -> None:
        if transaction.parent is None:
            self.tx_in(session.info).statements = 0

    def do_orm_execute(self, state: ORMExecuteState) -> Result[Any] | None:
        stmt = state.statement
        core = self.core
        if state.is_select:
            option = fromcache.from_cache_option(state)
            if option is not None and (option.cache is None or option.cache is core.owner):
                fresh = self._snapshot_is_fresh(state)
                self.tx_in(state.session.info).statements += 1
                return fromcache.execute(core, self.reads, state, option, fresh)
            if active_reads(core):
                bind = state.session.get_bind(**state.bind_arguments)
                params = state.parameters if isinstance(state.parameters, dict) else None
                tags = statement_read_tags(
                    stmt, params, core.codec.hash_salt, str(bind.dialect.name)
                )
                if not self._snapshot_is_fresh(state):
                    for ctx in active_reads(core):
                        ctx.forbid("a query read an older REPEATABLE READ snapshot")
                record_read(core, tags, "a query")
                self.tx_in(state.session.info).statements += 1
            return None
        if state.is_insert or state.is_update or state.is_delete:
            self._written(state.session, dml_write_tags(stmt))
        elif isinstance(stmt, TextClause):
            if text_is_read(stmt.text):
                if active_reads(core):
                    record_read(core, statement_read_tags(stmt), "a text() query")
            else:
                self._written(state.session, text_write_tags(stmt.text))
        return None

    def _snapshot_is_fresh(self, state: ORMExecuteState) -> bool:
        """False when this statement would read a transaction snapshot older than now.

        Under REPEATABLE READ or SERIALIZABLE the snapshot is fixed by the transaction's
        first statement, so only that statement's read is known to follow the generations
        read just before it. SQLite (pysqlite) runs reads outside a transaction.
        """
        tx = state.session.info.get(self.info_key)
        if tx is None or tx.statements == 0:
            return True
        bind: Any = state.session.get_bind(**state.bind_arguments)
        dialect = bind.dialect
        if dialect.name == "sqlite":
            return True
        level = state.execution_options.get("isolation_level")
        if level is None and hasattr(bind, "get_execution_options"):
            level = bind.get_execution_options().get("isolation_level")
        if level is None:
            level = getattr(dialect, "default_isolation_level", None)
        return str(level or "").upper() not in ("REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT")

    def before_commit(self, session: Session) -> None:
        if session.in_nested_transaction():
            return
        # Flush now so every tag of this transaction is known before the lease.
        session.flush()
        self.tx_in(session.info).lease(self.core)

    def after_commit(self, session: Session) -> None:
        if session.in_nested_transaction():
            return
        self._finish(session)

    def after_soft_rollback(self, session: Session, previous_transaction: Any) -> None:
        if previous_transaction.parent is None:
            self._finish(session)

    def after_transaction_end(self, session: Session, transaction: Any) -> None:
        # Also covers close() without commit or rollback: pending tags must not leak.
        if transaction.parent is None:
            self._finish(session)

    def _finish(self, session: Session) -> None:
        tx = session.info.pop(self.info_key, None)
        if tx is None:
            return
        set_pending_write_tags(id(session), frozenset())
        tx.release(self.core)


class EngineTracker(Tracker):
    """Core-only applications: DML on connections of an engine.

    There is no event after COMMIT on a Core connection, so the lease (with its bump) is
    taken before COMMIT and released when the connection next begins or returns to the
    pool; until then the leased tags are read through, never served stale.
    """

    def attach(self) -> None:
        engine = self.target
        for name in ("before_execute", "commit", "rollback", "begin"):
            self._listen(engine, name, getattr(self, name))
        self._listen(engine.pool, "checkin", self.checkin)

    def _release(self, info: dict[Any, Any]) -> None:
        tx = info.pop(self.info_key, None)
        if tx is not None:
            tx.release(self.core)

    def before_execute(
        self, conn: Connection, clauseelement: Any, multiparams: Any, params: Any, options: Any
    ) -> None:
        core = self.core
        if isinstance(clauseelement, (Insert, Update, Delete)):
            tags = dml_write_tags(clauseelement)
        elif isinstance(clauseelement, TextClause) and not text_is_read(clauseelement.text):
            tags = text_write_tags(clauseelement.text)
        else:
            if active_reads(core) and isinstance(clauseelement, (Select, TextClause)):
                record_read(
                    core,
                    statement_read_tags(
                        clauseelement, params or None, core.codec.hash_salt, conn.dialect.name
                    ),
                    "a query",
                )
            return
        self.tx_in(conn.info).written |= tags

    def commit(self, conn: Connection) -> None:
        tx = conn.info.get(self.info_key)
        if tx is not None:
            tx.lease(self.core)

    def rollback(self, conn: Connection) -> None:
        self._release(conn.info)

    def begin(self, conn: Connection) -> None:
        self._release(conn.info)

    def checkin(self, dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            self._release(record.info)


def sync_target(target: object) -> object:
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
        if getattr(base, "_ormcache_tracked", False):
            return base
        tracked = type(f"Tracked{base.__name__}", (base,), {"_ormcache_tracked": True})
        target.kw["sync_session_class"] = tracked
        return tracked
    if isinstance(target, type) and issubclass(target, AsyncSession):
        base = target.sync_session_class
        if getattr(base, "_ormcache_tracked", False) and "_ormcache_tracked" in vars(base):
            return base
        tracked = type(f"Tracked{base.__name__}", (base,), {"_ormcache_tracked": True})
        target.sync_session_class = tracked
        return tracked
    return target


def make_tracker(core: Core, reads: ReadPath, target: object) -> Tracker:
    """The tracker for a (sync) attach target; raises ConfigurationError for others."""
    if isinstance(target, Engine):
        return EngineTracker(core, reads, target)
    if isinstance(target, (sessionmaker, scoped_session)) or (
        isinstance(target, type) and issubclass(target, Session)
    ):
        return SessionTracker(core, reads, target)
    raise ConfigurationError(
        "cache.attach() takes a Session class, sessionmaker, scoped_session or Engine, "
        f"or their asyncio counterparts, got {target!r}"
    )
