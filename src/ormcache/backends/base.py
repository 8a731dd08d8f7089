"""The backend seam: a small bytes-level store that also keeps the consistency protocol.

A backend knows nothing of SQLAlchemy or of the codec. It stores opaque payloads under
entry keys, and keeps one *generation* counter per tag (a tag names something an entry
was computed from: a table, a row, an equality partition, or the whole namespace).

Why the protocol lives in the backend: every step that must be atomic (check the
generations and return the payload; compare-and-set a store against a snapshot; take a
lease and bump) has to run as one operation inside the store, e.g. one Lua script on
Redis, or under one lock in process memory.

The guarantees every backend gives (``ormcache.testing`` checks them):

* ``get`` returns a payload only while every generation recorded with the entry is still
  current, together with those tags and generations (an :class:`Entry`): the read path
  verifies a signed entry's MAC over exactly what the backend checked, so the backend
  never needs the secret. A tag whose generation key vanished (eviction, FLUSHALL,
  restart) is re-created with a fresh random value, so a vanished generation can never
  make an old entry valid.
* ``snapshot`` reads the current generations *before* the caller reads the database, and
  returns ``None`` while any of the tags is under a live write lease.
* ``set`` is a compare-and-set: it stores only if every tag still has the snapshot's
  generation and none is leased. A value computed from a read that began before a
  commit therefore can never be stored as current.
* Whatever a key under the namespace holds (garbage, a non-integer generation, another
  Redis type), no method raises anything but ``BackendError`` because of it, ``get``
  never serves against a generation it cannot read, and ``bump`` still invalidates
  every tag it is given: a generation it cannot advance is replaced or deleted.
* ``acquire_lease`` bumps the tags and leases them (before COMMIT); ``release_lease``
  bumps them again and drops the lease (after COMMIT). A lease expires by itself, so a
  crashed writer blocks stores on its tags only for ``ttl`` seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["UNREADABLE", "Backend", "Entry", "Snapshot", "redact_url"]


class Entry(NamedTuple):
    """What ``get`` found: the payload, and the tags and generations it was checked
    against (parallel tuples, as the entry recorded them at its store).

    A generation is an int or its decimal ASCII bytes (Redis hands back the recorded
    text; converting it on every hit would cost for nothing): ``int(g)`` is the same.
    The read path binds a signed entry's MAC to these, so a header rewritten in the
    backend (fewer tags, other generations) no longer matches the signature.
    """

    payload: bytes
    tags: tuple[str, ...]
    gens: tuple[int | bytes, ...]


#: Bytes counted per Python object an in-process entry keeps (object headers, tuple and
#: dict slots), on top of the length of its strings.
OBJECT_OVERHEAD = 64


def entry_weight(key: str, entry: Entry) -> int:
    """What keeping ``entry`` under ``key`` in process memory costs, in bytes, as a byte
    bound counts it: its tags and generations as well as its payload. A memoized call
    that read 300 rows has 300 row tags and a payload of a few bytes; counting only the
    payload let a 1 MB bound hold 83 MB."""
    size = len(entry.payload) + len(key) + 3 * OBJECT_OVERHEAD
    for tag, gen in zip(entry.tags, entry.gens, strict=True):
        size += len(tag) + (len(gen) if isinstance(gen, bytes) else 8) + 2 * OBJECT_OVERHEAD
    return size


#: What ``get`` returns when an entry key holds something that is not an entry of this
#: backend (garbage, another program's data, a key of another Redis type). Its payload
#: decodes as no payload of any codec version, so the read path counts it as corrupt
#: and deletes the key, as it does any undecodable payload. The foreign value itself is
#: never returned: it carries no generations to check, so serving it could serve
#: anything, forever. A missing or stale entry is None, as before.
UNREADABLE = Entry(b"\x00ormcache: this key holds no cache entry", (), ())


def _is_scheme(text: str) -> bool:
    """RFC 3986: a letter, then letters, digits, ``+``, ``-`` or ``.``."""
    return (
        text[:1].isascii()
        and text[:1].isalpha()
        and all(c.isascii() and (c.isalnum() or c in "+-.") for c in text)
    )


def redact_url(url: str) -> str:
    """The URL without its credentials, for error messages and logs: no user info, and
    no query string (``?password=``, ``?sentinel_password=``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not _is_scheme(scheme):
        # Not a URL (``redis:/:pw@host``, ``host:6379?password=pw``, a password pasted
        # in its place, ``redis:/:pw@h/?next=http://x``): which part is a credential
        # cannot be told, so none is shown.
        return "[not a URL: no scheme://]"
    # The host is what follows the last "@" (a password may hold "/") and comes before
    # the query or fragment. An "@" past the first "?" or "#" is ambiguous (an "@" in
    # the query, or a "?" in the password): nothing after the scheme is shown then.
    at = rest.rfind("@")
    ends = [i for i in (rest.find("?"), rest.find("#")) if i >= 0]
    end = min(ends, default=len(rest))
    if at > end:
        return f"{scheme}{sep}[redacted]"
    return f"{scheme}{sep}{rest[at + 1 : end]}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The generations of some tags, read before a database read.

    ``tags`` and ``gens`` are parallel tuples; tags are unique and sorted.
    """

    tags: tuple[str, ...]
    gens: tuple[int, ...]

    def merge(self, other: Snapshot) -> Snapshot | None:
        """Union of two snapshots, or ``None`` if they disagree on a tag.

        A disagreement means a commit happened between the two reads, so a value built
        from both must not be stored.
        """
        combined = dict(zip(self.tags, self.gens, strict=False))
        for tag, gen in zip(other.tags, other.gens, strict=False):
            if combined.setdefault(tag, gen) != gen:
                return None
        tags = tuple(sorted(combined))
        return Snapshot(tags, tuple(combined[t] for t in tags))


@runtime_checkable
class Backend(Protocol):
    """Every method may raise ``BackendError`` (and only that).

    The same interface serves asyncio (see :mod:`ormcache.aio`): on an event loop the
    methods run inside SQLAlchemy's greenlet bridge. A backend doing network I/O may
    also offer ``for_event_loop() -> Backend``, a twin for the running loop whose I/O
    is awaited there (``RedisBackend`` does); without it, calls on the loop block it.
    """

    def get(self, key: str) -> Entry | None:
        """The entry stored under ``key`` if present, unexpired and still current (its
        payload, and the tags and generations just checked); :data:`UNREADABLE` if the
        key holds something else."""
        ...

    def snapshot(self, tags: Sequence[str]) -> Snapshot | None:
        """Current generations of ``tags`` (creating missing ones), or None if leased."""
        ...

    def set(self, key: str, payload: bytes, ttl: float | None, snapshot: Snapshot) -> bool:
        """Store iff ``snapshot`` is still current and unleased; True if stored."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Remove entries (not generations)."""
        ...

    def bump(self, tags: Sequence[str]) -> None:
        """Advance the generations of ``tags``, invalidating every entry that read them."""
        ...

    def acquire_lease(self, tags: Sequence[str], token: str, ttl: float) -> None:
        """Bump ``tags`` and lease them for at most ``ttl`` seconds (before COMMIT)."""
        ...

    def release_lease(self, tags: Sequence[str], token: str) -> None:
        """Bump ``tags`` again and drop this token's lease (after COMMIT or rollback)."""
        ...

    def lock(self, key: str, token: str, ttl: float) -> bool:
        """Try to take the computation lock for ``key`` (expires after ``ttl`` seconds)."""
        ...

    def unlock(self, key: str, token: str) -> None:
        """Release the lock if ``token`` still holds it."""
        ...

    def clear(self) -> None:
        """Drop every entry and generation in this backend's namespace."""
        ...

    def close(self) -> None:
        """Release connections; the backend is not used afterwards."""
        ...
