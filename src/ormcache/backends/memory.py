"""The embedded default: an in-process LRU with TTL that keeps the full protocol.

It is also the fake the test suite uses, so it implements every guarantee of
:mod:`ormcache.backends.base` exactly, under one lock.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from .base import Entry, Snapshot, entry_weight

__all__ = ["MemoryBackend"]


def _fresh() -> int:
    """A new generation for a missing tag: random, so it never equals a recorded one."""
    return secrets.randbits(62)


class MemoryBackend:
    """Thread-safe LRU of entries plus generations and leases, all in this process.

    Entries are shared only within the process: use Redis when several processes write.
    Generations live in their own bounded LRU; evicting one is safe because a missing
    generation is re-created with a fresh random value.
    """

    def __init__(
        self,
        namespace: str = "",
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 2**20,
        max_tags: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.max_entries = max_entries
        #: Bytes held at most (:func:`entry_weight`: payload, key, tags and generations):
        #: counting entries alone let 3000 entries of 100 KB grow the process by 288 MB.
        self.max_bytes = max_bytes
        self._bytes = 0
        self.max_tags = max_tags
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (expires_at or None, the entry get returns as it is, its weight)
        self._entries: OrderedDict[str, tuple[float | None, Entry, int]] = OrderedDict()
        self._gens: OrderedDict[str, int] = OrderedDict()
        self._leases: dict[str, dict[str, float]] = {}
        self._locks: dict[str, tuple[str, float]] = {}

    # -- helpers (call with the lock held) --------------------------------------------
    def _gen(self, tag: str) -> int:
        gen = self._gens.get(tag)
        if gen is None:
            gen = self._gens[tag] = _fresh()
            if len(self._gens) > self.max_tags:
                self._gens.popitem(last=False)
        return gen

    def _drop(self, key: str) -> None:
        stored = self._entries.pop(key, None)
        if stored is not None:
            self._bytes -= stored[2]

    def _leased(self, tags: Sequence[str], now: float) -> bool:
        for tag in tags:
            holders = self._leases.get(tag)
            if not holders:
                continue
            for token, until in list(holders.items()):
                if until <= now:
                    del holders[token]
            if holders:
                return True
            del self._leases[tag]
        return False

    def _bump(self, tags: Sequence[str]) -> None:
        for tag in tags:
            gen = self._gens.get(tag)
            self._gens[tag] = _fresh() if gen is None else gen + 1
            self._gens.move_to_end(tag)
        while len(self._gens) > self.max_tags:
            self._gens.popitem(last=False)

    # -- Backend ----------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        with self._lock:
            stored = self._entries.get(key)
            if stored is None:
                return None
            expires, entry, _ = stored
            if expires is not None and expires <= self._clock():
                self._drop(key)
                return None
            if tuple(map(self._gens.get, entry.tags)) != entry.gens:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return entry

    def snapshot(self, tags: Sequence[str]) -> Snapshot | None:
        ordered = tuple(sorted(set(tags)))
        with self._lock:
            if self._leased(ordered, self._clock()):
                return None
            return Snapshot(ordered, tuple(self._gen(t) for t in ordered))

    def set(self, key: str, payload: bytes, ttl: float | None, snapshot: Snapshot) -> bool:
        with self._lock:
            now = self._clock()
            for tag, gen in zip(snapshot.tags, snapshot.gens):
                # A missing generation is a mismatch: it was evicted or cleared after the
                # snapshot, so the read may predate a write we can no longer see.
                if self._gens.get(tag) != gen:
                    return False
            if self._leased(snapshot.tags, now):
                return False
            expires = None if ttl is None else now + ttl
            entry = Entry(bytes(payload), snapshot.tags, tuple(snapshot.gens))
            weight = entry_weight(key, entry)
            if weight > self.max_bytes:
                self._drop(key)  # it could never fit: the value goes uncached
                return False
            self._drop(key)
            self._entries[key] = (expires, entry, weight)
            self._bytes += weight
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, _, old) = self._entries.popitem(last=False)
                self._bytes -= old
            return True

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._drop(key)

    def bump(self, tags: Sequence[str]) -> None:
        with self._lock:
            self._bump(tags)

    def acquire_lease(self, tags: Sequence[str], token: str, ttl: float) -> None:
        with self._lock:
            self._bump(tags)
            until = self._clock() + ttl
            for tag in tags:
                self._leases.setdefault(tag, {})[token] = until

    def release_lease(self, tags: Sequence[str], token: str) -> None:
        with self._lock:
            self._bump(tags)
            for tag in tags:
                holders = self._leases.get(tag)
                if holders is not None:
                    holders.pop(token, None)
                    if not holders:
                        del self._leases[tag]

    def lock(self, key: str, token: str, ttl: float) -> bool:
        with self._lock:
            now = self._clock()
            held = self._locks.get(key)
            if held is not None and held[1] > now:
                return False
            self._locks[key] = (token, now + ttl)
            if len(self._locks) > self.max_entries:
                self._locks = {k: v for k, v in self._locks.items() if v[1] > now}
            return True

    def unlock(self, key: str, token: str) -> None:
        with self._lock:
            held = self._locks.get(key)
            if held is not None and held[0] == token:
                del self._locks[key]

    def clear(self) -> None:
        with self._lock:
            # Leases survive: a writer mid-commit must still block stores on its tags.
            self._entries.clear()
            self._bytes = 0
            self._gens.clear()

    def close(self) -> None:
        """Nothing to release; entries stay until the process ends or ``clear()``."""
