"""The consistency protocol between readers, writers and the backend.

Readers: take a :class:`Snapshot` of the tags' generations *before* reading the
database, then store with a compare-and-set against it. Writers: take a write lease on the
touched tags before COMMIT (which also bumps them), and bump again and release after
COMMIT. Together these give "no read that starts after ``commit()`` returned is served
older data", with no wall clock anywhere:

* a read whose snapshot predates the lease fails its compare-and-set (the lease bumped);
* a read whose snapshot falls inside the lease gets no snapshot and does not store;
* a read after the release sees the committed data.

This module holds the per-context state of that protocol: the computations a read
belongs to, and the tags this context's open transactions have written. The backend side
is :class:`ormcache.guard.Guard`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field

from .backends.base import Snapshot

__all__ = [
    "NAMESPACE_TAG",
    "ReadContext",
    "active_reads",
    "begin_call",
    "call_failed",
    "collapse_tags",
    "end_call",
    "mark_call_failed",
    "next_seq",
    "pending_write_tags",
    "set_pending_write_tags",
]

#: Every entry depends on this tag, so ``clear()`` and DML whose tables cannot be known
#: invalidate everything with one bump.
NAMESPACE_TAG = "*"


#: At most this many distinct tags go into one bump, lease or debt; more collapse.
MAX_TAGS = 1000


def collapse_tags(tags: Iterable[str], limit: int = MAX_TAGS) -> list[str]:
    """``tags``, sorted, or a shorter list that invalidates at least as much.

    A commit of 100k rows owes 200k partition tags; one bump of them all took longer
    than the socket timeout, so it never completed. Past ``limit``, a partition tag
    ``p:<table>:...`` becomes its table's ``t:`` and ``a:`` tags (every entry that read a
    partition also recorded ``a:<table>``, every other read of the table ``t:<table>``);
    still past ``limit``, the namespace tag alone (every entry records it). Deterministic,
    so a lease and its release collapse to the same tags.
    """
    unique = set(tags)
    if len(unique) <= limit:
        return sorted(unique)
    if NAMESPACE_TAG in unique:
        return [NAMESPACE_TAG]
    out: set[str] = set()
    for tag in unique:
        if tag.startswith("p:"):
            table = tag.split(":", 2)[1]
            out.add("t:" + table)
            out.add("a:" + table)
        else:
            out.add(tag)
    return sorted(out) if len(out) <= limit else [NAMESPACE_TAG]


@dataclass(eq=False)
class ReadContext:
    """What one memoized computation read: the merged snapshot, and whether it may store.

    ``loaded`` collects the ORM states loaded or refreshed while the computation ran; an
    instance in the result that is not among them came from the identity map, possibly
    from a read older than the snapshot, so the result is not stored.
    """

    owner: object = None
    snapshot: Snapshot | None = None
    storable: bool = True
    reason: str = ""
    loaded: set[object] = field(default_factory=set)
    #: The computation accepts reads of time functions (``memoize(allow_time=True)``).
    allow_time: bool = False
    #: The key already holds the execution context (FromCache: database, schema map).
    keys_context: bool = False
    #: Why the computation's sessions held instances before it began (they can be used
    #: without a query), or None.
    preloaded: str | None = None
    #: tag -> sequence number (:func:`next_seq`) drawn before its generation was first
    #: read: what decides whether a later read from an older transaction snapshot is
    #: still covered by generations read before that snapshot began.
    first_seen: dict[str, int] = field(default_factory=dict)

    def record(self, snap: Snapshot | None, what: str = "a query", seq: int = 0) -> None:
        """Merge the generations read before one database read (``seq`` drawn before
        they were read)."""
        if not self.storable:
            return
        if snap is None:
            self.forbid(f"{what} ran while a write to its tables was committing")
            return
        merged = snap if self.snapshot is None else self.snapshot.merge(snap)
        if merged is None:
            self.forbid("a commit changed the data between two reads of this computation")
            return
        self.snapshot = merged
        for tag in snap.tags:
            self.first_seen.setdefault(tag, seq)

    def covers(self, tags: Iterable[str], began: int) -> bool:
        """Whether every tag's generation was read before sequence point ``began``.

        A statement that reads a transaction snapshot taken at ``began`` (REPEATABLE
        READ) sees data as of then; generations read before then still describe it.
        """
        first = self.first_seen
        return all(first.get(tag, began) < began for tag in tags)

    def forbid(self, reason: str) -> None:
        if self.storable:
            self.storable = False
            self.reason = reason


_reads: ContextVar[tuple[ReadContext, ...]] = ContextVar("ormcache_reads", default=())
#: Set when a backend call failed during the current cached call: the rest of that call
#: skips the backend, so one call never waits for more than one timeout.
_call_failed: ContextVar[bool] = ContextVar("ormcache_call_failed", default=False)


_seq = itertools.count(1)


def next_seq() -> int:
    """A process-wide increasing sequence number (orders snapshots and transactions)."""
    return next(_seq)


def call_failed() -> bool:
    """Whether a backend call already failed during the current cached call."""
    return _call_failed.get()


def mark_call_failed() -> None:
    _call_failed.set(True)


def begin_call() -> object:
    return _call_failed.set(False)


def end_call(token: object) -> None:
    _call_failed.reset(token)  # type: ignore[arg-type]


_EMPTY: frozenset[str] = frozenset()
# (per-writer tags, their union): the union is what the hot path reads.
_pending_writes: ContextVar[tuple[tuple[tuple[int, frozenset[str]], ...], frozenset[str]]] = (
    ContextVar("ormcache_pending_writes", default=((), _EMPTY))
)


def active_reads(owner: object = None) -> tuple[ReadContext, ...]:
    """The computations (innermost last) that the current read belongs to.

    With ``owner``, only those of that cache: a snapshot read from one cache's backend
    means nothing to another cache's compare-and-set.
    """
    contexts = _reads.get()
    if owner is None or not contexts:
        return contexts
    return tuple(c for c in contexts if c.owner is owner)


def push_reads(ctx: ReadContext) -> object:
    return _reads.set((*_reads.get(), ctx))


def pop_reads(token: object) -> None:
    _reads.reset(token)  # type: ignore[arg-type]


def pending_write_tags() -> frozenset[str]:
    """Tags written by uncommitted transactions in this context (thread or task).

    While non-empty, reads of those tags bypass the cache so a transaction always sees
    its own writes.
    """
    return _pending_writes.get()[1]


def set_pending_write_tags(writer: int, tags: frozenset[str]) -> None:
    """Record (or, with empty ``tags``, forget) what ``writer`` has written so far."""
    entries, _ = _pending_writes.get()
    kept = tuple((w, t) for w, t in entries if w != writer)
    if tags:
        kept = (*kept, (writer, tags))
    union: frozenset[str] = _EMPTY.union(*(t for _, t in kept)) if kept else _EMPTY
    _pending_writes.set((kept, union))
