"""The near cache: Redis hits served from process memory, as Redis would serve them
(but for expiry: a copy whose entry or generation key has expired is served until Redis
actually removes the key and pushes that; the read path still checks the entry's own
expiry, so only a generation's timing differs, and no write is missed by it).

An entry is valid while every generation it recorded is current, so a process that
knows the current generations can check an entry it already holds without asking
Redis. :class:`NearCache` wraps a Redis backend and keeps two bounded tables in memory:

* **generations**: generation key → the value this process last saw Redis confirm;
* **entries**: cache key → the entry (payload, tags, generations) Redis last served.

Redis pushes every change to a generation key, and to an entry key, through the
process's :class:`~ormcache.backends.redis.tracking.TrackingChannel` (on a Cluster,
its :class:`~ormcache.backends.redis.cluster_tracking.ClusterChannel`: one per primary); each
push removes the changed key from the tables. A hit first applies every push the socket holds, then
serves from memory only if every generation the entry recorded is still the one in the
table; anything else is today's one round trip, and its answer refills the tables.

Why a read that starts after ``commit()`` returned cannot be served older data, on one
host: the commit bumps its tags before COMMIT (the lease) and again after (the release),
each a round trip. Redis writes a bump's pushes into every tracking socket before it
processes a later command, so by the time the release's reply reaches the writer, the
lease's pushes already sit in every reader's socket, and the reader's hit drains them
before it looks at memory. Every other invalidation that returns to its caller
(``invalidate()``, ``clear()``, a delete, an owed bump paid later) is followed by a
``PING`` for the same reason, in every process that has Redis as its backend, near
cache or not (:meth:`ormcache.guard.Guard._fence`). On a Cluster this holds per node:
a tag's lease and release go to the node of its slot, and the fence pings every
primary. Across hosts a reader can be served the old entry for about its own one-way
delay from Redis minus the writer's last round trip and COMMIT: none while the links
are alike, never longer than the reader's one-way delay
(``benchmarks/bench_push_delay.py`` measures it).

Stores are not remembered (see :meth:`NearCache.set`): the read after a store refills
from Redis, one round trip.

Why refilling cannot undo a push: a refill is applied only if no push for any of its
keys was applied since just before the round trip that read it (a ring of recent pushes,
checked under the channel's lock), and only on the channel connection that was tracking
when the round trip began. Otherwise the answer is served but not remembered.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

from .base import OBJECT_OVERHEAD, UNREADABLE, Backend, Entry, Snapshot, entry_weight

__all__ = ["NearCache", "NearTables"]

#: Pushes remembered for the refill check; a refill that began more pushes ago than
#: this is not remembered (it is still served).
RING = 4096
_ALL = b""  # a ring mark: every key changed


class NearTables:
    """The process's local generations and entries, shared by a backend and its
    per-event-loop twins. Mutated only under the channel's lock (reads need none: a
    table only loses keys between refills)."""

    def __init__(self, entry_prefix: str, max_entries: int, max_bytes: int) -> None:
        self.entry_prefix = entry_prefix.encode()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: dict[str, tuple[Entry, tuple[bytes, ...], int]] = {}
        self.gens: dict[bytes, bytes] = {}
        #: What ``gens`` holds, as counted when learned: it outlives the entries that
        #: put it there, so it has a byte bound of its own (a quarter of ``max_bytes``).
        self.gens_bytes = 0
        self.bytes = 0
        self.seq = 0
        self.ring: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=RING)

    # -- Listener ----------------------------------------------------------------------
    def invalidated(self, names: Sequence[bytes] | None) -> None:
        if names is None:
            self.reset()
            return
        prefix, n = self.entry_prefix, len(self.entry_prefix)
        ring, gens = self.ring, self.gens
        for name in names:
            self.seq += 1
            ring.append((self.seq, name))
            if gens.pop(name, None) is None and name.startswith(prefix):
                self._drop(name[n:].decode("utf-8", "surrogateescape"))

    def reset(self) -> None:
        self.entries.clear()
        self.gens.clear()
        self.gens_bytes = 0
        self.bytes = 0
        self.seq += 1
        self.ring.append((self.seq, _ALL))

    # -- local changes (lock held) -------------------------------------------------------
    def forget(self, names: Sequence[bytes], keys: Sequence[str] = ()) -> None:
        """Our own invalidation of these generation keys and entries."""
        for name in names:
            self.seq += 1
            self.ring.append((self.seq, name))
            self.gens.pop(name, None)
        for key in keys:
            self.seq += 1
            self.ring.append((self.seq, self.entry_prefix + key.encode()))
            self._drop(key)

    def _drop(self, key: str) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old[2]

    def changed_since(self, seq: int, names: Sequence[bytes]) -> bool:
        """Whether a push for any of ``names`` (or for everything) came after ``seq``."""
        if self.seq == seq:
            return False
        ring = self.ring
        if not ring or ring[0][0] > seq + 1:
            return True  # the ring no longer reaches back that far
        wanted = set(names)
        wanted.add(_ALL)
        for s, name in reversed(ring):
            if s <= seq:
                return False
            if name in wanted:
                return True
        return False

    def learn(self, key: str, entry: Entry, names: tuple[bytes, ...]) -> None:
        # The entry's tags and our generation names for them count too (an entry with
        # many long row or partition tags can weigh more in them than in its payload),
        # and each name again in ``gens``.
        names_size = sum(map(len, names)) + len(names) * 2 * OBJECT_OVERHEAD
        size = entry_weight(key, entry) + names_size + sum(map(len, names))
        if size > self.max_bytes:
            return
        self._drop(key)
        entries = self.entries
        while entries and (len(entries) >= self.max_entries or self.bytes + size > self.max_bytes):
            # Oldest first: a dict keeps insertion order.
            self._drop(next(iter(entries)))
        if (
            len(self.gens) + len(names) > 4 * self.max_entries
            or self.gens_bytes + names_size > self.max_bytes // 4
        ):
            # Generations of entries long gone: start over (entries re-check remotely).
            self.gens.clear()
            self.gens_bytes = 0
        self.gens.update(zip(names, entry.gens))  # type: ignore[arg-type]
        # Counted as added (a name learned again counts again): the bound errs early.
        self.gens_bytes += names_size
        entries[key] = (entry, names, size)
        self.bytes += size


class NearCache:
    """A :class:`~ormcache.backends.base.Backend` in front of a Redis backend that
    serves hits from memory when the push channel vouches for them (module docstring).

    ``on_near_hit`` is called for every hit served from memory (the cache's stats).
    """

    def __init__(
        self,
        inner: Any,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 2**20,
        on_near_hit: Callable[[], None] | None = None,
        interval: float | None = None,
        _shared: tuple[NearTables, Any] | None = None,
    ) -> None:
        self._inner = inner
        self.namespace = inner.namespace
        self.where = inner.where
        self._on_near_hit = on_near_hit or (lambda: None)
        if _shared is None:
            tables = NearTables(inner.entry_name(""), max_entries, max_bytes)
            options = {} if interval is None else {"interval": interval}
            channel = inner.tracking_channel(tables, **options)
            _shared = (tables, channel)
        self._tables, self.channel = _shared
        self._gen_name = inner.gen_name

    @property
    def inner(self) -> Backend:
        """The Redis backend behind the near cache."""
        backend: Backend = self._inner
        return backend

    @property
    def client(self) -> Any:
        """The inner backend's redis-py client."""
        return self._inner.client

    def for_event_loop(self) -> NearCache:
        """The running loop's twin: the inner backend's twin, the same tables."""
        twin = self._inner.for_event_loop()
        if twin is self._inner:
            return self
        # Kept on the twin itself: it lives as long as its loop's twin does (the inner
        # backend drops the twins of closed loops).
        near: NearCache | None = getattr(twin, "_near_cache", None)
        if near is None:
            near = NearCache(twin, on_near_hit=self._on_near_hit, _shared=self._shared())
            twin._near_cache = near
        return near

    def _shared(self) -> tuple[NearTables, Any]:
        return self._tables, self.channel

    def _names(self, tags: Sequence[str]) -> tuple[bytes, ...]:
        gen_name = self._gen_name
        return tuple(gen_name(t).encode() for t in tags)

    # -- reads -------------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        tables, channel = self._tables, self.channel
        if channel.current():
            found = tables.entries.get(key)
            if found is not None:
                entry, names, _ = found
                # Every recorded generation against the table, in one C-level pass (a
                # generation the table lost reads as None, which matches nothing).
                if tuple(map(tables.gens.get, names)) == entry.gens:
                    self._on_near_hit()
                    return entry
        seq, epoch = tables.seq, channel.epoch
        remote: Entry | None = self._inner.get(key)
        if remote is None or remote is UNREADABLE:
            return remote
        # Kept only if no push since just before the round trip may have changed it,
        # on the connection that was tracking then (module docstring).
        names = self._names(remote.tags)
        with channel.lock:
            if (
                channel.up
                and channel.epoch == epoch
                and not tables.changed_since(seq, (*names, tables.entry_prefix + key.encode()))
            ):
                tables.learn(key, remote, names)
        return remote

    def snapshot(self, tags: Sequence[str]) -> Snapshot | None:
        snap: Snapshot | None = self._inner.snapshot(tags)
        return snap

    def set(self, key: str, payload: bytes, ttl: float | None, snapshot: Snapshot) -> bool:
        """Store, and remember nothing: the store's own push drops any copy, and the
        next read refills from Redis.

        A push does not say who changed the key, nor how often: Redis sends the keys
        that changed in one turn of its event loop as one push, so the push of our
        store and that of another process's delete right after it can be one. Counting
        pushes to tell our own from theirs kept a deleted entry in memory for good.
        """
        stored: bool = self._inner.set(key, payload, ttl, snapshot)
        return stored

    def lock(self, key: str, token: str, ttl: float) -> bool:
        taken: bool = self._inner.lock(key, token, ttl)
        return taken

    def unlock(self, key: str, token: str) -> None:
        self._inner.unlock(key, token)

    # -- invalidations ---------------------------------------------------------------------
    def _forget(self, tags: Sequence[str] = (), keys: Sequence[str] = ()) -> None:
        with self.channel.lock:
            self._tables.forget(self._names(tags), keys)

    def delete(self, keys: Sequence[str]) -> None:
        self._inner.delete(keys)
        self._forget(keys=keys)

    def bump(self, tags: Sequence[str]) -> None:
        self._inner.bump(tags)
        self._forget(tags)

    def fence(self) -> None:
        """The inner backend's fence (the guard runs it after every invalidation that
        returns to its caller, near cache or not: other processes' near caches drop
        their copies from its pushes)."""
        self._inner.fence()

    def acquire_lease(self, tags: Sequence[str], token: str, ttl: float) -> None:
        self._inner.acquire_lease(tags, token, ttl)
        self._forget(tags)

    def release_lease(self, tags: Sequence[str], token: str) -> None:
        # The commit's second round trip: the lease's pushes are in every reader's
        # socket by the time this returns (see the module docstring).
        self._inner.release_lease(tags, token)
        self._forget(tags)

    def clear(self) -> None:
        self._inner.clear()
        with self.channel.lock:
            self._tables.reset()

    def close(self) -> None:
        self.channel.close()
        self._inner.close()
