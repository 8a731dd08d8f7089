"""The backend as the cache sees it: :class:`Guard` never raises.

Every backend call of the read and write paths goes through a Guard. It absorbs backend
errors into misses, trips a circuit breaker, and remembers bumps it owes a backend that
was unreachable, refusing hits in this process until they are delivered: an entry that a
lost bump should have invalidated must never be served.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence

from .aio import in_bridge
from .backends.base import Backend, Entry, Snapshot
from .breaker import CircuitBreaker
from .errors import BackendError
from .protocol import MAX_TAGS, NAMESPACE_TAG, call_failed, collapse_tags, mark_call_failed
from .stats import Stats

__all__ = ["Guard", "RateLimitedLog"]

logger = logging.getLogger("ormcache")


class RateLimitedLog:
    """At most one warning per kind per ``interval`` seconds: an outage must not flood logs."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self.interval) < self.interval:
                return
            self._last[kind] = now
        logger.warning(message, *args)


_OWED_LIMIT = 1000


class Guard:
    """The backend as the cache sees it: never raises, counts and logs every failure.

    A failed bump is a debt: until it is paid, this process serves no hits (an entry it
    should have invalidated might still look current) and retries the bump first. A failed
    delete of an entry (``fn.invalidate(...)``) is a debt of the same kind. The
    administrative calls (``bump``, ``delete``, ``clear``) return whether they were
    delivered now, so a caller such as a migration script can fail loudly.
    """

    def __init__(
        self,
        backend: Backend,
        stats: Stats,
        breaker: CircuitBreaker,
        *,
        pay_every: float | None = None,
    ) -> None:
        self.backend = backend
        # A backend with a redis.asyncio twin per event loop (see ormcache.aio): used
        # from inside SQLAlchemy's greenlet bridge, so an event loop never blocks on it.
        self._on_loop: Callable[[], Backend] | None = getattr(backend, "for_event_loop", None)
        self.stats = stats
        self.breaker = breaker
        self.log = RateLimitedLog()
        self._owed: set[str] = set()
        # Debts taken on so far (a payment keeps what was owed anew while it ran).
        self._debts = 0
        # Leases whose release failed (token -> tags). Left alone they would block
        # stores on their tags until they expire, long after the backend is back (a
        # Sentinel failover takes about a second; a lease lives lease_ttl seconds).
        self._owed_releases: dict[str, tuple[str, ...]] = {}
        # Tokens whose lease this process holds: only those are worth releasing later
        # (a lease that failed to be taken has nothing to release).
        self._held: set[str] = set()
        # Computation locks whose unlock failed (key -> token). Left alone, the next miss
        # on that key would wait lock_wait seconds for a holder that has moved on.
        self._owed_unlocks: dict[str, str] = {}
        # Entry keys whose delete failed: served again once the backend is back, unless
        # deleted before the next hit.
        self._owed_deletes: set[str] = set()
        self._owed_lock = threading.Lock()
        # Debts are paid by the next call, or by a thread of their own every
        # ``pay_every`` seconds while any are owed (see _wake_payer).
        self._pay_every = pay_every
        self._payer: threading.Thread | None = None
        # Set by close(): the payer stops, and no new one starts.
        self._closing = threading.Event()
        if pay_every is not None:
            _paying.add(self)

    # -- plumbing ---------------------------------------------------------------------
    def _b(self) -> Backend:
        if self._on_loop is not None and in_bridge():
            return self._on_loop()
        return self.backend

    def _failed(self, op: str, exc: BackendError) -> None:
        mark_call_failed()
        self.stats.incr("errors")
        # A failure that made us wait stops commits from trying the backend while the
        # breaker is open (see _skip_write).
        opened = self.breaker.failure(slow=exc.slow)
        # The text, not the exception: a handler that keeps records (a test's capture, a
        # MemoryHandler) would keep its traceback, and with it this guard, alive.
        self.log.warning(op, "ormcache: backend %s failed, calling through: %s", op, str(exc))
        if opened:
            self.log.warning(
                "breaker",
                "ormcache: circuit breaker open for %.1fs after repeated backend failures",
                self.breaker.cooldown,
            )

    def _settle(self) -> bool:
        """Pay owed releases, bumps and deletes; True if nothing is owed any more."""
        if not self._owes():
            return True
        with self._owed_lock:
            owed = sorted(self._owed)
            releases = list(self._owed_releases.items())
            deletes = sorted(self._owed_deletes)
            debts = self._debts
        op = "bump"
        try:
            for token, tags in releases:
                self._b().release_lease(tags, token)
                with self._owed_lock:
                    self._owed_releases.pop(token, None)
            if owed:
                self._b().bump(owed)
            if deletes:
                op = "delete"
                self._b().delete(deletes)
            if owed or deletes:
                op = "fence"
                self._fence()
        except BackendError as exc:
            self._failed(op, exc)
            return False
        with self._owed_lock:
            # A debt taken on while this was paying (another thread's failed bump of a
            # tag in ``owed``) is for a write after the payment may have run: it stays,
            # and everything with it (paying twice is harmless; losing one is not).
            if self._debts == debts:
                self._owed.difference_update(owed)
                self._owed_deletes.difference_update(deletes)
        self.breaker.success()
        return not self._owed and not self._owed_deletes

    def _fence(self) -> None:
        """One more round trip after an invalidation that returns to its caller
        (``invalidate()``, a delete, ``clear()``, a debt paid), where the backend has
        one (Redis): by its reply, Redis has written the invalidation's pushes into
        every near cache's socket, so no process serves what it invalidated once the
        call has returned. Near cache or not in this process: others have one by
        default. (A commit needs none: its release is that second round trip.)"""
        fence = getattr(self._b(), "fence", None)
        if fence is not None:
            fence()

    def usable(self) -> bool:
        if call_failed():
            return False
        if not self.breaker.allow():
            self.stats.incr("bypasses")
            return False
        return self._settle()

    # -- reads ------------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        # usable() inlined for the common case (no failure, breaker closed, nothing
        # owed): this runs on every hit.
        breaker = self.breaker
        if call_failed() or breaker.is_open or self._owed or self._owed_deletes:  # noqa: SIM102
            if not self.usable():
                return None
        try:
            data = self._b().get(key)
        except BackendError as exc:
            self._failed("get", exc)
            return None
        breaker.success()
        return data

    def snapshot(self, tags: Sequence[str]) -> Snapshot | None:
        if not self.usable():
            return None
        try:
            snap = self._b().snapshot(tags)
        except BackendError as exc:
            self._failed("snapshot", exc)
            return None
        self.breaker.success()
        return snap

    def store(self, key: str, payload: bytes, ttl: float | None, snap: Snapshot) -> bool:
        if not self.usable():
            return False
        try:
            stored = self._b().set(key, payload, ttl, snap)
        except BackendError as exc:
            self._failed("set", exc)
            return False
        self.breaker.success()
        self.stats.incr("stores" if stored else "store_conflicts")
        return stored

    def delete(self, keys: Sequence[str]) -> bool:
        """True if the entries are gone now; else the delete is owed (see the class)."""
        try:
            self._b().delete(keys)
            self._fence()
        except BackendError as exc:
            self._failed("delete", exc)
            self.owe_deletes(keys)
            return False
        return True

    def lock(self, key: str, token: str, ttl: float) -> bool | None:
        """True if taken, False if another process holds it, None if the backend failed
        (then nobody can coordinate, so the caller computes)."""
        if not self.usable():
            return None
        if self._owed_unlocks and not self._pay_unlocks():
            return None
        try:
            taken = self._b().lock(key, token, ttl)
        except BackendError as exc:
            self._failed("lock", exc)
            return None
        self.breaker.success()
        return taken

    def unlock(self, key: str, token: str) -> None:
        try:
            self._b().unlock(key, token)
        except BackendError as exc:
            self._failed("unlock", exc)
            with self._owed_lock:
                if len(self._owed_unlocks) >= _OWED_LIMIT:
                    # The oldest lock has expired by itself long ago.
                    self._owed_unlocks.pop(next(iter(self._owed_unlocks)))
                self._owed_unlocks[key] = token

    def _pay_unlocks(self) -> bool:
        with self._owed_lock:
            owed = list(self._owed_unlocks.items())
        for key, token in owed:
            try:
                self._b().unlock(key, token)
            except BackendError as exc:
                self._failed("unlock", exc)
                return False
            with self._owed_lock:
                if self._owed_unlocks.get(key) == token:
                    del self._owed_unlocks[key]
        return True

    # -- writes -----------------------------------------------------------------------
    def owed_tags(self) -> list[str]:
        """Tags whose bump this process still owes the backend."""
        with self._owed_lock:
            return sorted(self._owed)

    def owe(self, tags: Sequence[str]) -> None:
        """Remember bumps to deliver before this process serves another hit. The debt
        stays bounded (see ``collapse_tags``), so paying it is one bounded bump."""
        with self._owed_lock:
            self._owe_locked(tags)
        self._wake_payer()

    def _owe_locked(self, tags: Sequence[str]) -> None:
        self._debts += 1
        self._owed.update(tags)
        if len(self._owed) > MAX_TAGS:
            self._owed = set(collapse_tags(self._owed))

    def _owes(self) -> bool:
        return bool(self._owed or self._owed_deletes or self._owed_releases)

    def _wake_payer(self) -> None:
        """Make sure a thread pays what is owed once the backend answers again.

        Until a debt is paid, other processes may serve what it should have
        invalidated, and a process that stops calling the cache (a worker between jobs,
        a script at its end) would otherwise never pay it.
        """
        if self._pay_every is None:
            return
        with self._owed_lock:
            payer = self._payer
            if payer is not None and payer.is_alive():  # not alive: gone, or a fork's copy
                return
            if self._closing.is_set():
                return
            # The thread holds the guard until the debt is paid, even if the cache is
            # dropped or reconfigured meanwhile: other processes may serve what the debt
            # invalidates until it is. ``close()`` stops it.
            self._payer = threading.Thread(
                target=self._pay_in_background, name="ormcache-debts", daemon=True
            )
            self._payer.start()

    def _pay_in_background(self) -> None:
        every = max(self._pay_every or 1.0, 0.01)
        while not self._closing.wait(every):
            if not self._pay_once():
                return

    def _pay_once(self) -> bool:
        """One background attempt; False once there is nothing left to pay."""
        with self._owed_lock:
            if self._closing.is_set() or not self._owes():
                self._payer = None
                return False
        # Tried whatever the breaker says: this thread serves no request, so waiting on a
        # dead backend costs nobody, while waiting out the breaker's cool-down would let
        # other processes (whose breakers closed at once) serve what the debt should
        # have invalidated for that long after the backend is back. Its success closes
        # the breaker for this process's callers too. A call of its own: a failure here
        # must not skip anyone else's backend.
        contextvars.Context().run(self._settle)
        return True

    def close(self) -> None:
        """The cache is closed: pay what is owed if the backend answers, then stop
        paying (the backend's connections are about to close). What stays unpaid is
        said: other processes may serve what it invalidates until their entries expire."""
        self.pay_now()
        self._closing.set()
        with self._owed_lock:
            unpaid = len(self._owed) + len(self._owed_deletes) + len(self._owed_releases)
            payer = self._payer
        _paying.discard(self)
        if payer is not None and payer is not threading.current_thread():
            payer.join(timeout=1.0)  # a payment under way ends before the backend closes
        if unpaid:
            logger.warning(
                "ormcache: cache closed with undelivered invalidations: %d (the backend did "
                "not answer); other processes may serve what they invalidate until it expires",
                unpaid,
            )

    def hand_over(self, heir: Guard, *, same_backend: bool) -> None:
        """Move what is owed to ``heir`` (the cache was reconfigured). Bumps always go
        along; releases and deletes only to the same server and namespace, since they
        name keys there: for another server this guard keeps them and pays them itself,
        as it does a debt it takes on later (a call that was under way)."""
        with self._owed_lock:
            owed, self._owed = self._owed, set()
            deletes: set[str] = set()
            releases: dict[str, tuple[str, ...]] = {}
            if same_backend:
                deletes, self._owed_deletes = self._owed_deletes, set()
                releases, self._owed_releases = self._owed_releases, {}
            held, self._held = (self._held, set()) if same_backend else (set(), self._held)
        with heir._owed_lock:
            heir._owe_locked(sorted(owed))
            heir._owed_deletes.update(deletes)
            heir._owed_releases.update(releases)
            heir._held.update(held)
        heir._wake_payer()
        self._wake_payer()

    def forked(self) -> None:
        """In a forked child: the payer thread is gone, and another thread may have
        held the lock when the process forked."""
        self._owed_lock = threading.Lock()
        self._payer = None
        closing = threading.Event()
        if self._closing.is_set():
            closing.set()
        self._closing = closing
        if self._owes():
            self._wake_payer()

    def pay_now(self) -> bool:
        """Try to pay every debt now (at exit); True if nothing is owed any more. Not
        while the breaker is open: the backend is down, and exiting should not wait."""
        if not self._owes():
            return True
        if not self.breaker.allow():
            return False
        return contextvars.Context().run(self._settle)

    def _skip_write(self) -> bool:
        """Whether a commit's lease, release or bump is owed without trying: the breaker
        is open after the backend made calls wait (hung, or unreachable behind a
        timeout), so a commit does not wait on it at all (see
        :meth:`CircuitBreaker.skips_writes`)."""
        return self.breaker.skips_writes()

    def owed_deletes(self) -> list[str]:
        """Entry keys whose delete this process still owes the backend."""
        with self._owed_lock:
            return sorted(self._owed_deletes)

    def owe_deletes(self, keys: Sequence[str]) -> None:
        """Remember deletes to deliver before this process serves another hit."""
        with self._owed_lock:
            self._debts += 1
            if len(self._owed_deletes) + len(keys) > _OWED_LIMIT:
                # Too many single entries: bumping the namespace invalidates them all.
                self._owed.add(NAMESPACE_TAG)
            else:
                self._owed_deletes.update(keys)
        self._wake_payer()

    def bump(self, tags: Sequence[str]) -> bool:
        """True if delivered now; else owed (this process serves no hits until it is)."""
        if not tags:
            return True
        self.stats.incr("invalidations")
        tags = collapse_tags(tags)
        if self._skip_write():
            self.owe(tags)
            return False
        try:
            self._b().bump(tags)
            self._fence()
        except BackendError as exc:
            self._failed("bump", exc)
            self.owe(tags)
            return False
        except BaseException:
            # Interrupted mid-call (an asyncio task cancelled while awaiting Redis): the
            # bump may not have happened, so it is owed, and the interruption goes on.
            self.owe(tags)
            raise
        self._delivered()
        return True

    def _delivered(self) -> None:
        """An invalidation went through: the backend answers again, so what is owed is
        paid now. A process that only writes would otherwise pay only at its next read,
        and until then other processes could serve what its failed bumps should have
        invalidated."""
        self.breaker.success()
        if self._owes():
            self._settle()

    def acquire_lease(self, tags: Sequence[str], token: str, ttl: float) -> None:
        tags = collapse_tags(tags)
        if self._skip_write():
            self.owe(tags)
            return
        try:
            self._b().acquire_lease(tags, token, ttl)
        except BackendError as exc:
            self._failed("lease", exc)
            self.owe(tags)
            # The release is still tried (unless the breaker has since given up on a
            # backend that makes calls wait): a lease that timed out may run on a busy
            # Redis after COMMIT, and one that was refused leaves Redis with nothing;
            # either way other processes may meanwhile store what this commit changes,
            # and only the release's bump, done before commit() returns, undoes that.
            return
        except BaseException:
            self.owe(tags)  # interrupted: see bump()
            raise
        with self._owed_lock:
            # Before anything that may be interrupted (a payment awaited on the loop):
            # a lease taken is a lease to release, or to owe the release of.
            self._held.add(token)
        self._delivered()

    def release_lease(self, tags: Sequence[str], token: str) -> None:
        self.stats.incr("invalidations")
        tags = collapse_tags(tags)
        with self._owed_lock:
            held = token in self._held
            self._held.discard(token)
        if self._skip_write():
            # The breaker gave up on a backend that makes calls wait: the bump is owed
            # rather than waited for.
            self._owe_release(tags, token, held)
            return
        try:
            self._b().release_lease(tags, token)
        except BackendError as exc:
            self._failed("release", exc)
            self._owe_release(tags, token, held)
            return
        except BaseException:
            self._owe_release(tags, token, held)  # interrupted: see bump()
            raise
        self._delivered()

    def _owe_release(self, tags: Sequence[str], token: str, held: bool) -> None:
        # The tags and the release together: a payment in between would bump the tags
        # and leave the release behind it, blocking stores until the lease expires.
        with self._owed_lock:
            self._owe_locked(tags)
            if held:
                if len(self._owed_releases) >= _OWED_LIMIT:
                    # The oldest lease has expired by itself long ago.
                    self._owed_releases.pop(next(iter(self._owed_releases)))
                self._owed_releases[token] = tuple(tags)
        self._wake_payer()

    def clear(self) -> bool:
        """True if the namespace was swept now; else a namespace bump is owed."""
        # An administrative sweep, reached only from the sync cache.clear(): always the
        # sync backend (an event loop's twin need not implement it).
        try:
            # No fence: Cache.clear() bumps the namespace next, and that is fenced.
            self.backend.clear()
        except BackendError as exc:
            self._failed("clear", exc)
            self.owe([NAMESPACE_TAG])
            return False
        return True


# Guards that pay their debts by themselves: they try once more as the process exits.
_paying: weakref.WeakSet[Guard] = weakref.WeakSet()


@atexit.register
def _pay_at_exit() -> None:
    for guard in list(_paying):
        guard.pay_now()
