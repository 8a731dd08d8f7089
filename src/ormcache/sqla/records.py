"""Transaction records: what one transaction wrote, for one cache, and its lease.

A record lives in a Session's ``info`` (what its flushes wrote) or in a connection's
(what was sent on it). Its write lease brackets COMMIT: taken (which bumps) before, and
released (bumping again) after COMMIT or rollback. While it holds tags, this context's
reads of them bypass the cache.
"""

from __future__ import annotations

import contextvars
import uuid
from typing import TYPE_CHECKING

from ormcache.protocol import set_pending_write_tags

if TYPE_CHECKING:
    from ormcache.core import Core

__all__ = ["TxRecord", "flushing"]


#: While a session of this context flushes: the tags its statements write at the cursor
#: level (the flush's own analysis then decides which of them it already covers).
flushing: contextvars.ContextVar[list[set[str]] | None] = contextvars.ContextVar(
    "ormcache_flushing", default=None
)


class TxRecord:
    """One transaction's writes for one cache, and its lease once taken."""

    __slots__ = ("lease_tags", "token", "written")

    def __init__(self) -> None:
        self.written: set[str] = set()
        self.token: str | None = None
        self.lease_tags: set[str] = set()

    def add(self, core: Core, tags: set[str]) -> None:
        new = tags - self.written
        if not new:
            return
        self.written |= new
        # This context's reads of these tags bypass the cache until the transaction ends.
        set_pending_write_tags(id(self), frozenset(self.written))
        # A write after the lease was taken (commit's own flush loop) is leased too.
        if self.token is not None:
            core.guard.acquire_lease(sorted(new), self.token, core.lease_ttl)
            self.lease_tags |= new

    def lease(self, core: Core) -> None:
        """Before COMMIT: lease (which bumps) everything written so far, once."""
        if self.written and self.token is None:
            self.token = uuid.uuid4().hex
            self.lease_tags = set(self.written)
            core.guard.acquire_lease(sorted(self.lease_tags), self.token, core.lease_ttl)

    def finish(self, core: Core) -> None:
        """After COMMIT or rollback: bump again and drop the lease, if one was taken."""
        set_pending_write_tags(id(self), frozenset())
        if self.token is not None:
            core.guard.release_lease(sorted(self.lease_tags), self.token)
            self.token = None
        # A connection's record outlives its transaction: the next one starts clean
        # (otherwise every later commit on the connection bumps these tags again).
        self.written = set()
