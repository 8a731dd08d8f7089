"""Counters that make the cache's behaviour observable, per ``Cache`` instance."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

__all__ = ["Stats", "StatsSnapshot"]


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A consistent copy of the counters at one moment.

    ``errors`` counts backend failures that were absorbed (the call went through to the
    database). ``corrupt`` counts payloads that failed to decode and were deleted.
    ``near_hits`` counts the hits (included in ``hits``) a near cache served from
    process memory, without a round trip to Redis. ``bypasses`` counts calls that
    skipped the cache on purpose (pending writes in the transaction, an open circuit
    breaker, a write lease). ``store_conflicts`` counts stores
    refused because a commit raced the read: each is a stale value that was not cached.
    """

    hits: int = 0
    near_hits: int = 0
    misses: int = 0
    stores: int = 0
    store_conflicts: int = 0
    invalidations: int = 0
    errors: int = 0
    corrupt: int = 0
    uncacheable: int = 0
    bypasses: int = 0
    stale_hits: int = 0
    early_refreshes: int = 0

    @property
    def hit_ratio(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict[str, float]:
        data: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["hit_ratio"] = round(self.hit_ratio, 4)
        return data


class Stats:
    """Thread-safe counters; incrementing is a dict update under a lock (~100 ns)."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {f.name: 0 for f in fields(StatsSnapshot)}

    def incr(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(**self._counts)

    def reset(self) -> None:
        with self._lock:
            for name in self._counts:
                self._counts[name] = 0
