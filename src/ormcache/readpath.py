"""The one read path: memoize and FromCache both come through :meth:`ReadPath.run`.

A caller describes a cached read with a :class:`Recipe` (how to compute, encode and decode
its value, which tags it depends on if it knows them, its TTLs) and a key. Everything
that makes the result trustworthy happens here, once:

1. **Serve rule.** Some reads must not use the cache at all: the caller's own reason
   (a locking read, a non-deterministic function, an older REPEATABLE READ snapshot), a
   transaction in this context that has written what the read depends on, or an
   enclosing memoized computation that must see every read of this one. Those compute
   (counted as bypasses) and store nothing.
2. **Lookup.** One backend read. An entry that fails to parse is counted as corrupt,
   deleted and treated as a miss; stale-while-revalidate and early refresh are decided
   from the entry's header.
3. **Snapshot, compute, store.** On a miss the generations of the read's tags are taken
   *before* the computation reads the database, the computation runs inside a
   :class:`~ormcache.protocol.ReadContext` that collects every read it makes, and the
   value is stored with a compare-and-set against those generations. The store rule
   refuses what may not be current: a read that overlapped a commit, a transaction
   with uncommitted writes, instances taken from the identity map rather than loaded.
   A value the codec cannot store takes the uncacheable path (``strict`` raises).
4. **Stampede control.** Concurrent misses on one key compute once: single-flight in
   the process, a backend lock across processes, bounded waits.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .aio import greenlet_spawn, in_bridge, pause, wait_for
from .errors import CorruptPayloadError, UncacheableValueError
from .protocol import (
    NAMESPACE_TAG,
    ReadContext,
    active_reads,
    begin_call,
    end_call,
    next_seq,
    pending_write_tags,
    pop_reads,
    push_reads,
)

if TYPE_CHECKING:
    from .backends.base import Snapshot
    from .core import Core

__all__ = ["ReadPath", "Recipe", "pending_blocks"]

logger = logging.getLogger("ormcache")

T = TypeVar("T")

# Every entry starts with (fresh until, seconds the computation took): what
# stale-while-revalidate and early refresh need, in 17 bytes. A signed entry (a cache
# with a secret) has its own tag, and its MAC follows the header (see ormcache.signing).
_META = struct.Struct(">cdd")
#: Threads refreshing stale entries (``stale_ttl``), and refreshes pending at most.
REFRESH_WORKERS = 4
REFRESH_PENDING = 256
_META_TAG = b"m"
_SIGNED_TAG = b"s"


class Recipe(Protocol[T]):
    """How one kind of cached read is computed and stored; ``call`` is per invocation."""

    name: str
    ttl: float | None
    negative_ttl: float | None
    stale_ttl: float | None
    early_refresh: float | None
    strict: bool
    single_flight: bool
    #: True when the computation's own queries record what they read (memoize: the
    #: session hooks do it); False when the recipe *is* one statement, whose tags
    #: :meth:`tags` must then give.
    tracked: bool

    def tags(self, call: Any) -> Sequence[str] | None:
        """The tags the value depends on, when known before computing (else None)."""

    def tables(self, call: Any) -> frozenset[str] | None:
        """Table names read, for the pending-write rule (None: any write counts)."""

    def compute(self, call: Any) -> T: ...

    def encode(self, value: T, on_instance: Callable[[object], None]) -> bytes:
        """The payload; raises UncacheableValueError for values that cannot be stored."""

    def decode(self, data: bytes, call: Any) -> T:
        """The value; raises CorruptPayloadError (or TypeError/ValueError) if invalid."""

    def loaded(self, value: T) -> Iterable[object]:
        """ORM states a hit puts in front of the caller (for enclosing computations)."""


def pending_blocks(tables: frozenset[str] | None) -> bool:
    """Whether this context's uncommitted writes touch what a read depends on.

    A transaction must see its own writes, and the cache holds only committed data, so
    such a read goes to the database. ``tables`` None means the read's tables are unknown:
    any pending write blocks it.
    """
    pending = pending_write_tags()
    if not pending:
        return False
    if tables is None or NAMESPACE_TAG in pending:
        return True
    return any(t.split(":", 2)[1] in tables for t in pending if ":" in t)


class ReadPath:
    """Runs recipes against one cache's :class:`~ormcache.core.Core`."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._flights: dict[str, threading.Event] = {}
        self._flights_lock = threading.Lock()
        self._warned: set[str] = set()
        # Background refresh tasks, kept referenced until done (loops hold tasks weakly).
        self._tasks: set[object] = set()
        # Keys being refreshed in the background, and the pool (with its pid) doing it.
        self._refreshing: set[str] = set()
        self._pool: tuple[ThreadPoolExecutor | None, int] = (None, 0)

    # -- entry point -----------------------------------------------------------------
    def run(
        self,
        recipe: Recipe[T],
        key: str,
        call: Any,
        bypass: str | None = None,
        *,
        older_snapshot: bool = False,
    ) -> T:
        """The value for ``key``: served from the cache when that is sound, else computed.

        ``bypass`` is the caller's reason why this read must not use the cache at all.
        ``older_snapshot`` says the read sees a transaction snapshot older than now
        (REPEATABLE READ after the transaction's first statement): it is neither served
        nor stored, and no enclosing computation may store what it read either.
        """
        token = begin_call()
        try:
            return self._run(recipe, key, call, bypass, older_snapshot)
        finally:
            end_call(token)

    def _run(self, recipe: Recipe[T], key: str, call: Any, bypass: str | None, older: bool) -> T:
        core = self.core
        outer = active_reads(core)
        if older:
            bypass = "it reads an older REPEATABLE READ snapshot"
            for ctx in outer:
                ctx.forbid(f"{recipe.name} read an older REPEATABLE READ snapshot")
        if bypass is None and pending_blocks(recipe.tables(call)):
            bypass = "the transaction has uncommitted writes to what it reads"
        if bypass is None and outer and recipe.tracked:
            # The enclosing computation must see every read this one makes.
            bypass = "inside another memoized computation"
        snap: tuple[Snapshot | None, int] | None = None
        if outer and not recipe.tracked:
            # A statement inside a memoized computation: its generations are part of
            # what the enclosing value depends on, taken before the database is read.
            snap = self._record_outer(recipe, call, outer)
        if bypass is not None:
            core.stats.incr("bypasses")
            logger.debug("ormcache: %s not cached: %s", recipe.name, bypass)
            return recipe.compute(call)

        found, value = self._lookup(recipe, key, call)
        if found:
            if outer:
                states = list(recipe.loaded(value))
                for ctx in outer:
                    ctx.loaded.update(states)
            return value  # type: ignore[no-any-return]
        core.stats.incr("misses")
        if recipe.single_flight and core.stampede_lock:
            return self._compute_once(recipe, key, call, snap)
        return self._compute(recipe, key, call, snap)

    def _record_outer(
        self,
        recipe: Recipe[Any],
        call: Any,
        outer: Sequence[ReadContext],
    ) -> tuple[Snapshot | None, int] | None:
        tags = recipe.tags(call)
        if tags is None:
            for ctx in outer:
                ctx.forbid(f"{recipe.name} reads tables ormcache cannot determine")
            return None
        seq = next_seq()
        snap = self.core.guard.snapshot(tags)
        for ctx in outer:
            ctx.record(snap, recipe.name, seq)
        return snap, seq

    # -- lookup ----------------------------------------------------------------------
    def lookup(self, recipe: Recipe[T], key: str, call: Any) -> tuple[bool, T | None]:
        """A hit, or (False, None); corrupt entries are dropped on the way."""
        return self._lookup(recipe, key, call)

    def _lookup(self, recipe: Recipe[T], key: str, call: Any) -> tuple[bool, Any]:
        core = self.core
        entry = core.guard.get(key)
        if entry is None:
            return False, None
        signer = core.signer
        try:
            if signer is None:
                data = entry.payload
                expected = _META_TAG
            else:
                # Before anything in the entry is trusted: the MAC covers this key, the
                # generations the backend just checked, the header and the payload.
                data = signer.verify(key, entry, _META.size)
                expected = _SIGNED_TAG
            tag, fresh_until, took = _META.unpack_from(data)
            if tag != expected:
                raise CorruptPayloadError("entry without its header, or signed differently")
        except (CorruptPayloadError, struct.error) as exc:
            return self._corrupt(recipe, key, exc)
        now = time.time()
        stale = now >= fresh_until
        if stale:
            # Past its TTL but kept for the stale window (entries a commit invalidated
            # never get here: the backend already refused them). The window is enforced
            # here too, from the header: a backend that lost the entry's TTL (or a
            # PERSIST by someone else) must not make it live forever.
            stale_ttl = recipe.stale_ttl
            if stale_ttl is None or now >= fresh_until + stale_ttl:
                return False, None
        elif recipe.early_refresh and took > 0:
            # XFetch: recompute a little before expiry, more likely the closer it gets
            # and the longer the computation takes, so expiry never stampedes.
            gap = -took * recipe.early_refresh * math.log(random.random() or 1e-12)
            if now + gap >= fresh_until:
                core.stats.incr("early_refreshes")
                return False, None
        try:
            value = recipe.decode(data[_META.size :], call)
        except (CorruptPayloadError, TypeError, ValueError) as exc:
            return self._corrupt(recipe, key, exc)
        if stale:
            self._refresh_in_background(recipe, key, call)
            core.stats.incr("stale_hits")
        core.stats.incr("hits")
        return True, value

    def _corrupt(self, recipe: Recipe[Any], key: str, exc: Exception) -> tuple[bool, None]:
        core = self.core
        core.stats.incr("corrupt")
        core.guard.log.warning(
            "corrupt", "ormcache: dropped an undecodable entry of %s: %s", recipe.name, exc
        )
        core.guard.delete([key])
        return False, None

    # -- compute and store -----------------------------------------------------------
    def _compute(
        self,
        recipe: Recipe[T],
        key: str,
        call: Any,
        snap: tuple[Snapshot | None, int] | None = None,
    ) -> T:
        core = self.core
        guard = core.guard
        ctx = ReadContext(
            owner=core,
            allow_time=getattr(recipe, "allow_time", False),
            keys_context=not recipe.tracked,
        )
        if recipe.tracked:
            # Read before anything the function reads: a clear() or an untracked write
            # that lands while it runs must fail the store below.
            seq = next_seq()
            ctx.record(guard.snapshot([NAMESPACE_TAG]), "the namespace check", seq)
            # Instances already in the call's sessions can be used without a query; a
            # value that no query of the call stands behind is then not stored (below).
            ctx.preloaded = core.preloaded(call) if core.preloaded is not None else None
        else:
            tags = recipe.tags(call)
            if tags is None:
                ctx.forbid(f"{recipe.name} reads tables ormcache cannot determine")
            elif snap is not None:
                ctx.record(snap[0], recipe.name, snap[1])
            else:
                seq = next_seq()
                ctx.record(guard.snapshot(tags), recipe.name, seq)
        token = push_reads(ctx)
        started = time.perf_counter()
        try:
            value = recipe.compute(call)
        finally:
            pop_reads(token)
        took = time.perf_counter() - started
        self._store(recipe, key, value, ctx, took)
        return value

    def _store(self, recipe: Recipe[T], key: str, value: T, ctx: ReadContext, took: float) -> None:
        """The store rule, then a compare-and-set against the generations read first."""
        core = self.core
        if pending_write_tags():
            ctx.forbid("the transaction has uncommitted writes")
        instances: list[object] = []
        try:
            # Encoded even when the store rule refuses: a value that can never be cached
            # is reported the same way whatever the reason it is not stored this time.
            payload = recipe.encode(value, instances.append)
        except UncacheableValueError as exc:
            self.uncacheable(recipe.name, exc, recipe.strict)
            return
        snap = ctx.snapshot
        if ctx.preloaded and snap is not None and all(t == NAMESPACE_TAG for t in snap.tags):
            ctx.forbid(ctx.preloaded)
        if not ctx.storable or ctx.snapshot is None:
            logger.debug("ormcache: %s not stored: %s", recipe.name, ctx.reason)
            return
        stale = stale_instance(instances, ctx) if core.tracks_loads else None
        if stale is not None:
            core.stats.incr("bypasses")
            logger.debug(
                "ormcache: not storing %s: %s came from the identity map, loaded before "
                "this read, so it may predate the snapshot",
                recipe.name,
                stale,
            )
            return
        ttl = recipe.ttl
        if value is None and recipe.negative_ttl is not None:
            ttl = recipe.negative_ttl
        fresh_until = math.inf if ttl is None else time.time() + ttl
        if ttl is not None and recipe.stale_ttl is not None:
            ttl += recipe.stale_ttl
        snap = ctx.snapshot
        signer = core.signer
        if signer is None:
            data = _META.pack(_META_TAG, fresh_until, took) + payload
        else:
            header = _META.pack(_SIGNED_TAG, fresh_until, took)
            data = signer.sign(key, snap.tags, snap.gens, header, payload)
        core.guard.store(key, data, ttl, snap)

    def uncacheable(self, name: str, exc: UncacheableValueError, strict: bool) -> None:
        """Count a value that cannot be cached; raise in strict mode, else log once."""
        self.core.stats.incr("uncacheable")
        if strict:
            raise exc
        if name not in self._warned:
            self._warned.add(name)
            logger.warning(
                "ormcache: %s returned a value that cannot be cached, so it is served "
                "uncached (logged once): %s",
                name,
                exc,
            )

    # -- stampede control --------------------------------------------------------------
    def _compute_once(
        self,
        recipe: Recipe[T],
        key: str,
        call: Any,
        snap: tuple[Snapshot | None, int] | None = None,
        *,
        refresh: bool = False,
    ) -> T:
        """Many concurrent misses on one key cost one computation.

        Within the process, followers wait for the leader (single-flight); across
        processes, the leader takes a lock in the backend and the others poll for the
        stored value. Every wait is bounded by ``lock_wait``, after which a waiter computes
        itself, so a dead lock holder (its lock also expires) never blocks anyone for long.
        Followers read the stored entry rather than share the leader's objects, so each
        caller gets its own instances. A background refresh (``refresh``) never waits: if
        someone else is computing, it has nothing to do.
        """
        core = self.core
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = threading.Event()
        if not leader:
            if refresh:
                return None  # type: ignore[return-value]
            wait_for(flight, core.lock_wait)
            found, value = self._lookup(recipe, key, call)
            return value if found else self._compute(recipe, key, call)
        try:
            token = uuid.uuid4().hex
            lock_key = "lk:" + key
            taken = core.guard.lock(lock_key, token, core.lock_ttl)
            if taken is False:
                deadline = time.monotonic() + core.lock_wait
                delay = 0.005
                while time.monotonic() < deadline:
                    pause(delay)
                    delay = min(delay * 2, 0.05)
                    if refresh:
                        return None  # type: ignore[return-value]
                    found, value = self._lookup(recipe, key, call)
                    if found:
                        return value  # type: ignore[no-any-return]
                return self._compute(recipe, key, call)
            try:
                return self._compute(recipe, key, call, snap)
            finally:
                if taken:
                    core.guard.unlock(lock_key, token)
        finally:
            with self._flights_lock:
                self._flights.pop(key, None)
            flight.set()

    def _refresh_in_background(self, recipe: Recipe[Any], key: str, call: Any) -> None:
        """Refresh a stale entry without making the caller wait: on a small pool of
        worker threads (or the caller's event loop), at most one refresh per key and
        ``REFRESH_PENDING`` in all. Past that, the stale value is served as is and a later
        hit asks again: 2000 stale keys once made 2000 threads."""
        with self._flights_lock:
            if key in self._flights or key in self._refreshing:
                return
            if len(self._refreshing) >= REFRESH_PENDING:
                return
            self._refreshing.add(key)
        if in_bridge():
            # An async caller: the refresh is a task of its event loop, like the call
            # itself, never a thread (which has no loop to await on). In a context of
            # its own, as on a worker thread: the caller's (its enclosing computations'
            # reads, its session variables) is not the refresh's to use.
            import asyncio

            loop = asyncio.get_running_loop()
            task = contextvars.Context().run(
                loop.create_task, greenlet_spawn(self._refresh, recipe, key, call)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._refresh_pool().submit(self._refresh, recipe, key, call)

    def _refresh_pool(self) -> ThreadPoolExecutor:
        pool, pid = self._pool
        if pool is None or pid != os.getpid():
            # A forked child inherits the pool object but none of its threads.
            with self._flights_lock:
                pool, pid = self._pool
                if pool is None or pid != os.getpid():
                    pool = ThreadPoolExecutor(
                        REFRESH_WORKERS, thread_name_prefix="ormcache-refresh"
                    )
                    self._pool = (pool, os.getpid())
        return pool

    def _refresh(self, recipe: Recipe[Any], key: str, call: Any) -> None:
        token = begin_call()
        try:
            self._compute_once(recipe, key, call, refresh=True)
        except Exception:
            logger.warning("ormcache: background refresh of %s failed", recipe.name, exc_info=True)
        finally:
            end_call(token)
            with self._flights_lock:
                self._refreshing.discard(key)


def stale_instance(instances: Iterable[object], ctx: ReadContext) -> str | None:
    """The first persistent ORM instance not loaded during ``ctx``, described, or None.

    Such an instance came from the identity map, possibly from a read older than the
    snapshot, so a value built from it is not stored.
    """
    if not instances:
        return None
    from sqlalchemy import inspect

    for obj in instances:
        state: Any = inspect(obj)
        if state.key is not None and state not in ctx.loaded:
            return f"{type(obj).__name__}{state.key[1]!r}"
    return None
