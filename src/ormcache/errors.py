"""The exceptions ormcache raises, all under one root.

::

    OrmCacheError                 catch-all for anything ormcache raises on purpose
    ├── ConfigurationError        a bad URL, option or combination, found at construction
    ├── UncacheableValueError     strict mode: a value (or argument) the codec cannot store
    └── BackendError              the cache backend failed (never escapes a cached call;
        │                         invalidate/clear raise it with raise_on_error=True)
        └── CorruptPayloadError   bytes that are not a payload we wrote: a miss, never a crash

``OrmCacheError``, ``ConfigurationError``, ``UncacheableValueError`` and ``BackendError``
are part of the top-level API (``from ormcache import ...``). A cached call never raises
``BackendError``: the cache degrades to calling through, and the error is counted in
``Cache.stats()``. Only the administrative calls raise it, and only when asked to:
``cache.invalidate(..., raise_on_error=True)`` and ``cache.clear(raise_on_error=True)``,
for a script that must not go on when an invalidation was not delivered. Backends
translate their driver's errors into it (``raise ... from exc``) instead of leaking them.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigurationError",
    "CorruptPayloadError",
    "OrmCacheError",
    "UncacheableValueError",
]


class OrmCacheError(Exception):
    """Root of every error ormcache raises deliberately."""


class ConfigurationError(OrmCacheError, ValueError):
    """The cache was configured in a way that cannot work; the message says how to fix it."""


class UncacheableValueError(OrmCacheError, TypeError):
    """A value cannot be stored faithfully, so storing it would break "a hit equals a miss".

    ``path`` locates the offending part inside the value, e.g.
    ``value['_sa_instance_state']``, so the fix can go exactly there.
    """

    def __init__(self, message: str, *, path: str = "value") -> None:
        super().__init__(message)
        self.path = path


class BackendError(OrmCacheError):
    """The cache backend could not be reached or answered with an error.

    ``slow`` says the failure made the caller wait (a timeout: the backend hangs or is
    unreachable), as opposed to failing at once (a refused connection, an error reply).
    """

    slow: bool = False


class CorruptPayloadError(BackendError):
    """Bytes under a cache key that this codec did not write, or cannot trust.

    Raised by the codec for garbage, truncated or foreign (e.g. pickle) data, a bad
    signature, an unknown mapper or a changed schema. The cache turns it into a miss,
    counts it and deletes the key.
    """
