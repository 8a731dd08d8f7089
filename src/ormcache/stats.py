"""Counters that make the cache's behaviour observable, per ``Cache`` instance."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

__all__ = ["Stats", "StatsSnapshot"]


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A copy of the counters.

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
    """Thread-safe counters, cheap enough to count every hit.

    Each counter is an ``itertools.count``: ``next()`` on it is a single C call, which
    the GIL makes atomic, for about a sixth of the cost of a dict update under a lock (a
    near hit is counted twice, as a hit and a near hit, and costs a few microseconds in
    all). A counter's value is read from its ``repr``, ``count(N)``: the one way to read
    it without advancing it. A snapshot reads the counters one after another.
    """

    __slots__ = ("_counters",)

    def __init__(self) -> None:
        self._counters = _zeroed()

    def incr(self, name: str, amount: int = 1) -> None:
        if amount == 1:
            next(self._counters[name])
            return
        counter = self._counters[name]
        for _ in range(amount):
            next(counter)

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(**{name: _value(c) for name, c in self._counters.items()})

    def reset(self) -> None:
        self._counters = _zeroed()


def _zeroed() -> dict[str, itertools.count[int]]:
    return {f.name: itertools.count() for f in fields(StatsSnapshot)}


def _value(counter: itertools.count[int]) -> int:
    return int(repr(counter)[6:-1])  # "count(N)"
