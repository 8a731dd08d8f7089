"""Cursor-level listeners: what one cache sees of one engine's connections.

Every statement on a watched engine crosses :class:`EngineWatch`, whatever API sent it,
which makes this the one place writes are captured (the write path) and where reads
inside a cached computation are recorded from the statement actually sent. Per DBAPI
connection it keeps the statement count of the current transaction and the isolation
level, which decide whether a read sees data as of now (see ``tracking``).
"""

from __future__ import annotations

import uuid
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ormcache.protocol import NAMESPACE_TAG, active_reads, next_seq

from .catalog import dependent_writes
from .execution import execution_read_tags, execution_serve_reason, execution_write_tags
from .records import TxRecord, flushing

if TYPE_CHECKING:
    from .tracking import Wiring

__all__ = ["EngineWatch", "isolation_level"]

_SNAPSHOT_LEVELS = frozenset(("REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"))


class _ConnState:
    """What one cache knows of one DBAPI connection's current transaction."""

    __slots__ = ("began", "record", "statements")

    def __init__(self) -> None:
        self.statements = 0
        self.began = 0
        self.record = TxRecord()


def isolation_level(conn: Connection) -> str:
    """The isolation level a connection runs at, as far as SQLAlchemy set it.

    The execution option wins (``session.connection(execution_options=...)``,
    ``engine.execution_options(...)``, ``create_engine(isolation_level=...)``); otherwise
    the level the server reported when the connection was made.
    """
    level = conn.get_execution_options().get("isolation_level")
    if level is None:
        level = getattr(conn.dialect, "_on_connect_isolation_level", None) or getattr(
            conn, "default_isolation_level", None
        )
    return str(level or "").upper()


def _autocommit(conn: Connection) -> bool:
    check = getattr(conn, "_is_autocommit_isolation", None)
    if check is not None:
        return bool(check())
    return isolation_level(conn) == "AUTOCOMMIT"  # pragma: no cover - other SQLAlchemy


class EngineWatch:
    """The cursor-level listeners of one cache on one engine.

    The watch holds its engine weakly: an application factory that runs once per test
    makes an engine per app, and a watch must not keep each one (and its pooled
    connections) alive after the application dropped it. The listeners live on the
    engine, so they go with it; the wiring forgets the watch then.
    """

    def __init__(self, wiring: Wiring, engine: Engine) -> None:
        self.wiring = wiring
        self.core = wiring.core
        self._engine = weakref.ref(engine, self._gone)
        self.engine_id = id(engine)
        self.key = ("ormcache.conn", id(self))
        self.owners: set[int] = set()
        self._listeners: list[tuple[bool, str, Any]] = []

    @property
    def engine(self) -> Engine | None:
        return self._engine()

    def _gone(self, ref: object) -> None:
        self._listeners.clear()
        self.wiring.forget(self)

    def install(self, engine: Engine) -> None:
        for name in (
            "before_cursor_execute",
            "after_cursor_execute",
            "handle_error",
            "begin",
            "commit",
        ):
            self._listen(engine, False, name, getattr(self, name))
        self._listen(engine, False, "rollback", self.rollback)
        self._listen(engine, True, "checkin", self.checkin)

    def _listen(self, engine: Engine, on_pool: bool, name: str, fn: Any) -> None:
        event.listen(engine.pool if on_pool else engine, name, fn)
        self._listeners.append((on_pool, name, fn))

    def remove(self) -> None:
        engine = self.engine
        if engine is not None:
            for on_pool, name, fn in reversed(self._listeners):
                target = engine.pool if on_pool else engine
                if event.contains(target, name, fn):
                    event.remove(target, name, fn)
        self._listeners.clear()

    def state(self, info: dict[Any, Any]) -> _ConnState:
        st = info.get(self.key)
        if st is None:
            st = info[self.key] = _ConnState()
        return st

    def fresh(self, conn: Connection) -> bool:
        """Whether the next statement on ``conn`` reads data as of now.

        Under REPEATABLE READ or SERIALIZABLE the snapshot is fixed by the transaction's
        first statement, so only that one is known to follow the generations read just
        before it. SQLite (pysqlite) runs reads outside a transaction.
        """
        st = conn.info.get(self.key)
        if st is None or st.statements == 0 or conn.dialect.name == "sqlite":
            return True
        return isolation_level(conn) not in _SNAPSHOT_LEVELS

    # -- events ----------------------------------------------------------------------
    def before_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        st = self.state(conn.info)
        first = st.statements == 0
        st.statements += 1
        try:
            self._classify(conn, st, first, statement, context)
        finally:
            if first:
                # The transaction's snapshot (REPEATABLE READ) begins with this
                # statement: after every generation read so far.
                st.began = next_seq()

    def _classify(
        self, conn: Connection, st: _ConnState, first: bool, statement: str, context: Any
    ) -> None:
        core = self.core
        dialect = conn.dialect.name
        writes = execution_write_tags(context, statement, dialect, core.declared)
        if writes is not None:
            self._written(conn, st, writes, context)
            return
        contexts = active_reads(core)
        if not contexts:
            return
        options = getattr(context, "execution_options", None) or {}
        tenant = bool(options.get("schema_translate_map"))
        for ctx in contexts:
            reason = execution_serve_reason(context, statement, dialect, ctx.allow_time)
            if reason is not None:
                ctx.forbid(reason)
            elif tenant and not ctx.keys_context:
                # The same call under another schema map reads other tables: a memoize
                # key (function and arguments) cannot tell them apart.
                ctx.forbid(
                    "a query ran with a schema_translate_map, which its key does not hold; "
                    "use FromCache (its key holds the map) or a namespace per tenant"
                )
        tags = execution_read_tags(context, statement, dialect, core.codec.hash_salt)
        if tags is None:
            for ctx in contexts:
                ctx.forbid("a query reads tables ormcache cannot determine")
            return
        tags.add(NAMESPACE_TAG)
        if not first and not self.fresh(conn):
            # Data as of the transaction's first statement: sound only where every
            # generation it depends on was read before that statement.
            for ctx in contexts:
                if not ctx.covers(tags, st.began):
                    ctx.forbid("a query read an older REPEATABLE READ snapshot")
            return
        seq = next_seq()
        snap = core.guard.snapshot(sorted(tags))
        for ctx in contexts:
            ctx.record(snap, "a query", seq)

    def _written(self, conn: Connection, st: _ConnState, tags: set[str], context: Any) -> None:
        core = self.core
        tags = dependent_writes(conn, tags, core.declared)
        if _autocommit(conn):
            # Committed as it runs: lease now, release right after it (below).
            token = uuid.uuid4().hex
            ordered = sorted(tags)
            core.guard.acquire_lease(ordered, token, core.lease_ttl)
            context._ormcache_autocommit = (ordered, token)
            return
        sent = flushing.get()
        if sent is not None:
            sent.append(tags)
            return
        st.record.add(core, tags)

    def after_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        self._release_autocommit(context)

    def handle_error(self, exception_context: Any) -> None:
        """An autocommit statement that raised (or was cancelled) gets no
        ``after_cursor_execute``: its lease is released here, with its bump, since the
        server may have applied it anyway (a driver error after the write, a cancelled
        await); else stores on its tags stay refused until the lease expires."""
        self._release_autocommit(exception_context.execution_context)

    def _release_autocommit(self, context: Any) -> None:
        """Release the lease an autocommit statement took in ``_written``, once."""
        leased = getattr(context, "_ormcache_autocommit", None)
        if leased is not None:
            context._ormcache_autocommit = None
            self.core.guard.release_lease(*leased)

    def begin(self, conn: Connection) -> None:
        st = self.state(conn.info)
        st.statements = 0
        st.record.finish(self.core)

    def commit(self, conn: Connection) -> None:
        st = conn.info.get(self.key)
        if st is not None:
            st.record.lease(self.core)

    def rollback(self, conn: Connection) -> None:
        st = conn.info.get(self.key)
        if st is not None:
            st.statements = 0
            st.record.finish(self.core)

    def checkin(self, dbapi_connection: Any, record: Any) -> None:
        st = None if record is None else record.info.get(self.key)
        if st is not None:
            st.statements = 0
            st.record.finish(self.core)
