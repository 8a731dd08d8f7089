"""The state a ``Cache`` hands to its read and write paths.

``Cache`` is the public front; the paths below it (memoize, FromCache, session tracking)
receive one :class:`Core` and never reach back into ``Cache``. The Core object keeps its
identity for the life of the ``Cache`` (it is what read contexts and transaction records
belong to), while :meth:`Core.configure` swaps its parts when ``init_app`` applies new
settings.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from .backends import Backend, create_backend
from .backends.memory import MemoryBackend
from .breaker import CircuitBreaker
from .codec import Codec
from .errors import ConfigurationError
from .guard import Guard
from .signing import Signer
from .sqla.catalog import Declarations
from .stats import Stats

__all__ = ["Core", "Settings"]

logger = logging.getLogger("ormcache")

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


#: The longest lease_ttl (seconds); leased.lua drops lease tokens that would outlive it.
MAX_LEASE_TTL = 600.0


@dataclass(frozen=True)
class Settings:
    """The constructor's keyword arguments, validated when built (see ``Cache``)."""

    url: str | None = None
    namespace: str = "ormcache"
    default_ttl: float | None = 300.0
    strict: bool = False
    secret: str | bytes | None = None
    lease_ttl: float = 5.0
    connect_timeout: float = 0.25
    socket_timeout: float = 0.25
    breaker_threshold: int = 3
    breaker_cooldown: float = 5.0
    max_entries: int = 10_000
    max_bytes: int = 64 * 2**20
    generation_ttl: float = 60.0
    stampede_lock: bool = True
    lock_wait: float = 5.0
    lock_ttl: float = 30.0
    near_cache: bool | int | None = None
    backend: Backend | None = None

    def __post_init__(self) -> None:
        if not _NAMESPACE_RE.match(self.namespace):
            raise ConfigurationError(
                f"namespace {self.namespace!r} is invalid: use 1-64 characters from "
                "A-Z a-z 0-9 _ . -"
            )
        if self.default_ttl is not None and self.default_ttl <= 0:
            raise ConfigurationError(
                "default_ttl must be positive seconds or None (no expiry), "
                f"got {self.default_ttl!r}"
            )
        if float(self.generation_ttl) <= 0:
            raise ConfigurationError(
                f"generation_ttl must be positive seconds, got {self.generation_ttl!r}"
            )
        if not 0 < float(self.lease_ttl) <= MAX_LEASE_TTL:
            raise ConfigurationError(
                f"lease_ttl must be positive seconds, at most {MAX_LEASE_TTL:.0f} (a lease "
                f"that would outlive it is taken for a foreign one), got {self.lease_ttl!r}"
            )
        near = self.near_cache
        if (
            near is not None
            and not isinstance(near, bool)
            and (not isinstance(near, int) or near < 1)
        ):
            raise ConfigurationError(
                f"near_cache must be True, False, None (the default for the URL) or a "
                f"positive number of entries, got {near!r}"
            )
        if float(self.lock_wait) < 0 or float(self.lock_ttl) <= 0:
            raise ConfigurationError(
                "lock_wait must be >= 0 and lock_ttl > 0 seconds; lock_ttl should exceed your "
                "slowest computation"
            )

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def changed(self, **changes: Any) -> Settings:
        unknown = set(changes) - set(self.names())
        if unknown:
            raise ConfigurationError(
                f"Cache.configure() got unknown settings {sorted(unknown)}; "
                f"valid ones are {sorted(self.names())}"
            )
        if "url" in changes and "backend" not in changes:
            changes["backend"] = None
        return replace(self, **changes)

    @property
    def resolved_url(self) -> str:
        return self.url or "memory://"


class Core:
    """Codec, guarded backend, counters and settings: everything a path needs.

    The counters survive reconfiguration (an ``init_app`` must not erase what the
    application has already observed), and so do bumps owed to the old backend: they are
    paid to it if it answers, and otherwise carried over to the new one, so a commit
    whose invalidation failed is never forgotten.
    """

    def __init__(self, settings: Settings) -> None:
        self.stats = Stats()
        #: Set by ``attach()``: ORM loads are tracked, so a value built from instances
        #: that were not loaded during its computation can be recognised.
        self.tracks_loads = False
        #: The ``Cache`` in front (``FromCache(cache=...)`` names it).
        self.owner: object = None
        #: Set by ``attach()``: why a memoized call may use objects loaded before it.
        self.preloaded: Callable[[Any], str | None] | None = None
        #: Whether an engine's reads and writes are seen (set by ``attach()``; until
        #: then, none are).
        self.watching: Callable[[Any], bool] = lambda engine: False
        self.settings = settings
        #: What the application declares its database writes on its own (triggers,
        #: routines); read by the write path, kept across reconfiguration.
        self.declared = Declarations()
        self.codec = self._codec(settings, None)
        #: Signs and verifies whole entries when a secret is set (see ``signing``).
        self.signer = self._signer(settings)
        self.backend = self._backend(settings, self.stats)
        self.guard = self._guard(settings, self.backend)
        self._apply(settings)
        self._warned_fork = False
        _live.add(self)

    def forked(self) -> None:
        """Called in a child process after ``fork()`` (a gunicorn or uWSGI worker made
        from a master that imported the application).

        A ``memory://`` cache is then one copy per worker: a commit in one worker bumps
        only its own generations, and the others keep serving what it changed. Once
        sessions are attached that is a silent stale read, so it is said once.
        """
        self.guard.forked()
        if self._warned_fork or not self.tracks_loads:
            return
        if not isinstance(self.backend, MemoryBackend):
            return
        self._warned_fork = True
        message = (
            "ormcache: a memory:// cache with attached sessions is running in a forked "
            "worker process; memory:// entries are per process, so commits in other "
            "workers cannot invalidate them and this worker may serve stale data. Use "
            "redis:// (ORMCACHE_URL) when the application runs in several processes"
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _apply(self, settings: Settings) -> None:
        self.settings = settings
        self.namespace = settings.namespace
        self.default_ttl = settings.default_ttl
        self.strict = settings.strict
        self.lease_ttl = float(settings.lease_ttl)
        self.stampede_lock = bool(settings.stampede_lock)
        self.lock_wait = float(settings.lock_wait)
        self.lock_ttl = float(settings.lock_ttl)

    @staticmethod
    def _secret(settings: Settings) -> bytes | None:
        secret = settings.secret
        return (secret.encode() if isinstance(secret, str) else secret) or None

    @classmethod
    def _signer(cls, settings: Settings) -> Signer | None:
        key = cls._secret(settings)
        return None if key is None else Signer(key, settings.namespace)

    @classmethod
    def _codec(cls, settings: Settings, old: Codec | None) -> Codec:
        # Payloads are not signed on their own: the read path signs the whole entry.
        codec = Codec(secret=cls._secret(settings), sign=False)
        if old is not None:
            codec.adopt_registrations(old)
        return codec

    @staticmethod
    def _backend(settings: Settings, stats: Stats) -> Backend:
        if settings.backend is not None:
            return settings.backend
        url = settings.resolved_url
        options: dict[str, Any]
        if url.startswith("memory"):
            options = {"max_entries": settings.max_entries, "max_bytes": settings.max_bytes}
            return create_backend(url, settings.namespace, **options)
        options = {
            "socket_timeout": settings.socket_timeout,
            "connect_timeout": settings.connect_timeout,
            "generation_ttl": float(settings.generation_ttl),
        }
        backend = create_backend(url, settings.namespace, **options)
        near = near_cache_for(url, settings.near_cache)
        if not near:
            return backend
        from .backends.near import NearCache

        return NearCache(
            backend,
            max_entries=settings.max_entries if near is True else int(near),
            max_bytes=settings.max_bytes,
            on_near_hit=lambda: stats.incr("near_hits"),
        )

    def _guard(self, settings: Settings, backend: Backend) -> Guard:
        breaker = CircuitBreaker(
            threshold=settings.breaker_threshold, cooldown=settings.breaker_cooldown
        )
        return Guard(backend, self.stats, breaker, pay_every=PAY_EVERY)

    def configure(self, settings: Settings) -> None:
        """Rebuild codec, backend and guard for new settings, keeping owed bumps."""
        codec = self._codec(settings, self.codec)
        backend = self._backend(settings, self.stats)
        guard = self._guard(settings, backend)
        old_guard, old_backend = self.guard, self.backend
        if backend is not old_backend:
            old_guard.pay_now()  # what the old backend is owed (deletes too), if it answers
        owed = old_guard.owed_tags()
        if owed:
            logger.warning(
                "ormcache: reconfigured with %d invalidation(s) not yet delivered; they are "
                "carried over and sent to the new backend first",
                len(owed),
            )
        self.codec, self.backend, self.guard = codec, backend, guard
        # After the swap: a debt the old guard takes on from now is a call that was
        # under way, and it pays that itself.
        old_guard.hand_over(
            guard, same_backend=backend is old_backend or _same_keys(settings, self.settings)
        )
        self.signer = self._signer(settings)
        self._apply(settings)
        if old_backend is not backend:
            old_backend.close()


def _same_keys(new: Settings, old: Settings) -> bool:
    """Whether a new backend holds the keys the old one did: built for the same URL and
    namespace (``configure(default_ttl=...)`` builds a new backend for the URL it had),
    so that the entries and leases one names are the other's."""
    return (
        new.backend is None
        and old.backend is None
        and new.resolved_url == old.resolved_url
        and new.namespace == old.namespace
    )


#: Seconds between a guard's attempts to pay its debts while nobody calls the cache.
PAY_EVERY = 1.0


def near_cache_for(url: str, near_cache: bool | int | None) -> bool | int:
    """Whether (and with how many entries) a cache at ``url`` keeps a near cache.

    On by default for one Redis server and for Sentinel. On a Cluster only when asked
    for (``near_cache=True`` or a number): it costs every process one tracking
    connection per primary and a ``CLUSTER NODES`` per primary per health interval, and
    every topology change turns it off in every process until the channel is set up
    again (README, "Near cache"). ``memory://`` is already in the process.
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory" or near_cache is False:
        return False
    if scheme == "redis+cluster" and near_cache is None:
        return False
    if importlib.util.find_spec("hiredis") is None:
        if near_cache:
            raise ConfigurationError(
                "near_cache needs the hiredis parser: pip install 'ormcache[redis]'"
            )
        return False
    return True if near_cache is None else near_cache


# Every live Core, told when this process is a fork's child (one hook for all of them).
_live: weakref.WeakSet[Core] = weakref.WeakSet()


def _after_fork() -> None:
    for core in list(_live):
        core.forked()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_after_fork)
