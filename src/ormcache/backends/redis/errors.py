"""redis-py's errors as :class:`~ormcache.errors.BackendError`, from one table.

The cache's guard catches ``BackendError`` (and only that), logs it and serves the call
uncached, so every exception a Redis client call can raise must become one, and its
message should say what to check. The table maps an exception class to that advice; a
raised exception takes the row of its most specific class (its MRO decides), and the
last row, ``Exception``, catches what the client raises outside its own hierarchy (a
``TypeError`` from an unknown URL option, met only when the first connection is made).
``tests/test_backends.py`` checks that every class redis-py defines has a row of its
own or a redis-py base's, never just the catch-all.

redis-py's ``ConnectionError`` and ``TimeoutError`` shadow builtin names, so the module
is only ever referred to as ``rx``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions as rx
from redis.sentinel import MasterNotFoundError, SlaveNotFoundError

from ormcache.errors import BackendError, ConfigurationError

__all__ = ["ERRORS", "row_for", "run_redis"]

T = TypeVar("T")

_DEFAULT = "failed {what}: {name}: {exc}"
_TIMEOUT = (
    "did not answer {what} in time ({exc}); it is overloaded or unreachable, or "
    "socket_timeout is too low"
)
_NO_NODE = "could not be reached for {what} ({exc}); check that the nodes are running"

# Most specific first only for reading; the lookup walks the raised class's MRO.
ERRORS: dict[type[BaseException], str] = {
    rx.TimeoutError: _TIMEOUT,
    asyncio.TimeoutError: _TIMEOUT,
    rx.AuthenticationError: (
        "refused the credentials during {what} ({exc}); check the user name and "
        "password in the cache URL"
    ),
    rx.AuthorizationError: (
        "refused the credentials during {what} ({exc}); check the user name and "
        "password in the cache URL"
    ),
    rx.BusyLoadingError: "is still loading its data set ({what}); caching resumes once it is up",
    rx.MaxConnectionsError: (
        "has no free connection for {what} ({exc}); raise the pool's max_connections"
    ),
    MasterNotFoundError: (
        "has no master the Sentinels agree on for {what} ({exc}); check the service "
        "name in the cache URL and that the Sentinels are running"
    ),
    SlaveNotFoundError: "has no replica the Sentinels know of for {what} ({exc})",
    rx.ConnectionError: (
        "refused or dropped the connection during {what} ({exc}); check that it is "
        "running and that ORMCACHE_URL points at it"
    ),
    rx.OutOfMemoryError: (
        "refused {what}: out of memory ({exc}); raise maxmemory, choose an eviction "
        "policy such as allkeys-lru, or shorten the cache's TTLs"
    ),
    rx.ReadOnlyError: (
        "is a read-only replica and refused {what} ({exc}); point the cache URL at the "
        "master, or use redis+sentinel:// to follow failovers"
    ),
    rx.NoPermissionError: (
        "denied {what} to this ACL user ({exc}); grant the user the commands, and the "
        "keys under the namespace, that the cache needs"
    ),
    rx.NoScriptError: "has no copy of a script for {what} ({exc}); it is loaded on the next call",
    rx.ClusterDownError: "is down or failing over during {what} ({exc}); caching resumes after",
    rx.TryAgainError: "is migrating slots during {what} ({exc}); the next call retries",
    rx.ResponseError: "refused {what}: {exc}",
    rx.DataError: "could not encode {what} ({exc}); this is a bug in ormcache, please report it",
    rx.InvalidResponse: "answered {what} with a reply the client cannot parse ({exc})",
    rx.RedisError: _DEFAULT,
    rx.SlotNotCoveredError: (
        "has no node serving a slot for {what} ({exc}); check that every slot is assigned"
    ),
    rx.RedisClusterException: _DEFAULT,
    rx.ChildDeadlockedError: (
        "client was forked while a connection was in use ({what}); create the cache after "
        "forking, or in each worker"
    ),
    OSError: _NO_NODE,
    Exception: _DEFAULT,
}
# Classes outside RedisError that only newer redis-py versions define.
for _name in ("IncorrectPolicyType",):
    _kind = getattr(rx, _name, None)
    if isinstance(_kind, type) and issubclass(_kind, BaseException):
        ERRORS[_kind] = _DEFAULT


def row_for(kind: type[BaseException]) -> type[BaseException] | None:
    """The class whose row applies to exceptions of ``kind``: its most specific base
    in :data:`ERRORS`."""
    for base in kind.__mro__:
        if base in ERRORS:
            return base
    return None


def run_redis(where: str, what: str, call: Callable[[], T]) -> T:
    """Run one Redis call; any error the client raises becomes a ``BackendError`` whose
    message starts with ``where`` and says what to check."""
    try:
        return call()
    except (BackendError, ConfigurationError):
        raise
    except Exception as exc:
        row = row_for(type(exc))
        template = ERRORS[row] if row is not None else _DEFAULT
        message = template.format(what=what, name=type(exc).__name__, exc=exc)
        error = BackendError(f"{where} {message}")
        error.slow = template is _TIMEOUT
        raise error from exc
