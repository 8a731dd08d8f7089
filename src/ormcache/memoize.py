"""``@cache.memoize``: cache any function's result, invalidated by the data it read.

A miss runs the function inside a :class:`~ormcache.protocol.ReadContext`: every query it
executes (when the cache is attached to the session or engine) records the generations of
what it read, *before* reading. The result is stored with a compare-and-set against those
generations, so a result computed from data that a concurrent commit changed is never
stored as current.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from .aio import await_only, greenlet_spawn, pause, wait_for
from .errors import CorruptPayloadError, UncacheableValueError
from .keys import ArgumentKeyer, function_prefix
from .protocol import (
    NAMESPACE_TAG,
    ReadContext,
    active_reads,
    begin_call,
    end_call,
    pending_write_tags,
    pop_reads,
    push_reads,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .cache import Cache

__all__ = ["AsyncMemoized", "Memoized"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("ormcache")

# Memoize entries carry (fresh until, seconds the computation took) before the payload:
# what stale-while-revalidate and early refresh need, in 17 bytes.
_META = struct.Struct(">cdd")
_META_TAG = b"m"

#: ``merge=`` accepts True (the session the cache is attached to, if it is a
#: ``scoped_session``) or a callable returning the session to merge hits into.
MergeTarget = bool | Callable[[], "Session | None"]


class Memoized(Generic[P, R]):
    """The memoized function: call it as the original; it also has ``invalidate``."""

    def __init__(
        self,
        cache: Cache,
        fn: Callable[P, R],
        *,
        ttl: float | None,
        negative_ttl: float | None = None,
        stale_ttl: float | None = None,
        early_refresh: float | None = None,
        strict: bool,
        merge: MergeTarget,
        ignore: Collection[str],
        version: str | int | None,
    ) -> None:
        self._cache = cache
        self._fn = fn
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_ttl = stale_ttl
        self.early_refresh = early_refresh
        self.strict = strict
        self._merge = merge
        self.prefix = function_prefix(fn, version)
        self._ignore = tuple(ignore)
        self._keyer = ArgumentKeyer(fn, self.prefix, cache.codec, ignore)
        self._warned_uncacheable = False
        self._flights: dict[str, threading.Event] = {}
        self._flights_lock = threading.Lock()
        functools.update_wrapper(self, fn)

    # -- public -----------------------------------------------------------------------
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        token = begin_call()
        try:
            return self._call(args, kwargs)
        finally:
            end_call(token)

    def _call(self, args: Any, kwargs: Any) -> R:
        cache = self._cache
        try:
            key = self._keyer(args, kwargs)
        except UncacheableValueError as exc:
            return self._uncacheable(exc, args, kwargs)

        # Inside another memoized computation the outer one must see every read this
        # call makes, and inside a transaction with uncommitted writes the cache may hold
        # data older than those writes: in both cases compute instead of looking up.
        if active_reads() or pending_write_tags():
            cache.stats_counters.incr("bypasses")
            return self._compute(key, args, kwargs)
        found, value = self._lookup(key, args, kwargs)
        if found:
            return value  # type: ignore[return-value]
        cache.stats_counters.incr("misses")
        if not cache.stampede_lock:
            return self._compute(key, args, kwargs)
        return self._compute_once(key, args, kwargs)

    def _lookup(self, key: str, args: Any, kwargs: Any) -> tuple[bool, object]:
        cache = self._cache
        data = cache.guard.get(key)
        if data is None:
            return False, None
        try:
            tag, fresh_until, took = _META.unpack_from(data)
            if tag != _META_TAG:
                raise CorruptPayloadError("memoize entry without its header")
        except (CorruptPayloadError, struct.error) as exc:
            return self._corrupt(key, exc)
        now = time.time()
        stale = now >= fresh_until
        if stale:
            # Past its TTL but kept for the stale window (entries a commit invalidated
            # never get here: the backend already refused them).
            if self.stale_ttl is None:
                return False, None
        elif self.early_refresh and took > 0:
            # XFetch: recompute a little before expiry, more likely the closer it gets
            # and the longer the computation takes, so expiry never stampedes.
            gap = -took * self.early_refresh * math.log(random.random() or 1e-12)
            if now + gap >= fresh_until:
                cache.stats_counters.incr("early_refreshes")
                return False, None
        try:
            # Decided to serve it: a hit that merges decodes straight into the merge
            # session (only now, so a refused entry never reaches the session).
            into = None if self._merge is False else cache.adopter(self._merge)
            value = cache.codec.decode(data[_META.size :], into=into)
        except CorruptPayloadError as exc:
            return self._corrupt(key, exc)
        if stale:
            self._refresh_in_background(key, args, kwargs)
            cache.stats_counters.incr("stale_hits")
        cache.stats_counters.incr("hits")
        return True, value

    def _corrupt(self, key: str, exc: Exception) -> tuple[bool, object]:
        cache = self._cache
        cache.stats_counters.incr("corrupt")
        cache.guard.log.warning(
            "corrupt", "ormcache: dropped an undecodable entry of %s: %s", self.prefix, exc
        )
        cache.guard.delete([key])
        return False, None

    def _refresh_in_background(self, key: str, args: Any, kwargs: Any) -> None:
        with self._flights_lock:
            if key in self._flights:
                return
        self._start_refresh(key, args, kwargs)

    def _start_refresh(self, key: str, args: Any, kwargs: Any) -> None:
        thread = threading.Thread(
            target=self._refresh, args=(key, args, kwargs), name="ormcache-refresh", daemon=True
        )
        thread.start()

    def _refresh(self, key: str, args: Any, kwargs: Any) -> None:
        token = begin_call()
        try:
            self._compute_once(key, args, kwargs, refresh=True)
        except Exception:
            logger.warning("ormcache: background refresh of %s failed", self.prefix, exc_info=True)
        finally:
            end_call(token)

    def _compute_once(self, key: str, args: Any, kwargs: Any, *, refresh: bool = False) -> R:
        """Many concurrent misses on one key cost one computation.

        Within the process, followers wait for the leader (single-flight); across
        processes, the leader takes a lock in the backend and the others poll for the
        stored value. Every wait is bounded by ``lock_wait``, after which a waiter computes
        itself, so a dead lock holder (its lock also expires) never blocks anyone for long.
        Followers read the stored entry rather than share the leader's objects, so each
        caller gets its own instances.
        """
        cache = self._cache
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = threading.Event()
        if not leader:
            if refresh:
                return None  # type: ignore[return-value]
            wait_for(flight, cache.lock_wait)
            found, value = self._lookup(key, args, kwargs)
            return value if found else self._compute(key, args, kwargs)  # type: ignore[return-value]
        try:
            token = uuid.uuid4().hex
            lock_key = "lk:" + key
            taken = cache.guard.lock(lock_key, token, cache.lock_ttl)
            if taken is False:
                deadline = time.monotonic() + cache.lock_wait
                delay = 0.005
                while time.monotonic() < deadline:
                    pause(delay)
                    delay = min(delay * 2, 0.05)
                    if refresh:
                        return None  # type: ignore[return-value]
                    found, value = self._lookup(key, args, kwargs)
                    if found:
                        return value  # type: ignore[return-value]
                return self._compute(key, args, kwargs)
            try:
                return self._compute(key, args, kwargs)
            finally:
                if taken:
                    cache.guard.unlock(lock_key, token)
        finally:
            with self._flights_lock:
                self._flights.pop(key, None)
            flight.set()

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the entry for these arguments (the same binding rules as a call)."""
        self._cache.guard.delete([self._keyer(args, kwargs)])
        self._cache.stats_counters.incr("invalidations")

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The backend key for these arguments; argument values appear only hashed."""
        return self._keyer(args, kwargs)

    def rebind(self) -> None:
        """Pick up a reconfigured cache's codec (``init_app`` after decoration)."""
        self._keyer = ArgumentKeyer(self._fn, self.prefix, self._cache.codec, self._ignore)

    # -- internals --------------------------------------------------------------------
    def _compute(self, key: str, args: Any, kwargs: Any) -> R:
        cache = self._cache
        ctx = ReadContext(owner=cache)
        # Read before anything the function reads: a clear() or an untracked write that
        # lands while it runs must fail the store below.
        ctx.record(cache.guard.snapshot([NAMESPACE_TAG]), "the namespace check")
        token = push_reads(ctx)
        started = time.perf_counter()
        try:
            value = self._invoke(args, kwargs)
        finally:
            pop_reads(token)
        took = time.perf_counter() - started
        if pending_write_tags():
            ctx.forbid("the transaction has uncommitted writes")
        if not ctx.storable or ctx.snapshot is None:
            return value

        instances: list[object] = []
        try:
            payload = cache.codec.encode(value, on_instance=instances.append)
        except UncacheableValueError as exc:
            self._report_uncacheable(exc)
            return value
        if instances and cache.tracks_loads:
            stale = cache.stale_instance(instances, ctx)
            if stale is not None:
                cache.stats_counters.incr("bypasses")
                logger.debug(
                    "ormcache: not storing %s: %s came from the identity map, loaded "
                    "before this call, so it may predate the snapshot",
                    self.prefix,
                    stale,
                )
                return value
        ttl = self.ttl
        if value is None and self.negative_ttl is not None:
            ttl = self.negative_ttl
        fresh_until = math.inf if ttl is None else time.time() + ttl
        if ttl is not None and self.stale_ttl is not None:
            ttl += self.stale_ttl
        header = _META.pack(_META_TAG, fresh_until, took)
        cache.guard.store(key, header + payload, ttl, ctx.snapshot)
        return value

    def _uncacheable(self, exc: UncacheableValueError, args: Any, kwargs: Any) -> R:
        self._report_uncacheable(exc)
        return self._invoke(args, kwargs)

    def _invoke(self, args: Any, kwargs: Any) -> R:
        return self._fn(*args, **kwargs)

    def _report_uncacheable(self, exc: UncacheableValueError) -> None:
        self._cache.stats_counters.incr("uncacheable")
        if self.strict:
            raise exc
        if not self._warned_uncacheable:
            self._warned_uncacheable = True
            logger.warning(
                "ormcache: %s returned a value that cannot be cached, so it is served "
                "uncached (logged once per function): %s",
                self.prefix,
                exc,
            )


class AsyncMemoized(Memoized[P, R]):
    """A memoized ``async def``: calling it returns a coroutine, as the original does.

    The lookup, the computation and the store run as the synchronous implementation
    inside SQLAlchemy's greenlet bridge (``greenlet_spawn``): the function's coroutine
    and every backend round trip are awaited on the event loop, and waits for another
    task's computation yield to the loop instead of blocking it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Refresh tasks, kept referenced until done (the loop holds tasks weakly).
        self._tasks: set[object] = set()

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._acall(args, kwargs)  # type: ignore[return-value]

    async def _acall(self, args: Any, kwargs: Any) -> Any:
        return await greenlet_spawn(self._bridged, args, kwargs)

    def _bridged(self, args: Any, kwargs: Any) -> R:
        token = begin_call()
        try:
            return self._call(args, kwargs)
        finally:
            end_call(token)

    def _invoke(self, args: Any, kwargs: Any) -> R:
        # In the bridge: the event loop runs the coroutine, and this greenlet resumes
        # with its result.
        return await_only(self._fn(*args, **kwargs))  # type: ignore[arg-type]

    def _start_refresh(self, key: str, args: Any, kwargs: Any) -> None:
        # Always in the bridge here: the refresh is a task of this event loop, like the
        # call itself, never a thread (which has no loop to await on).
        import asyncio

        task = asyncio.get_running_loop().create_task(
            greenlet_spawn(self._refresh, key, args, kwargs)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
