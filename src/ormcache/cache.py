"""``Cache``: the one front object over codec, protocol and backend."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from sqlalchemy import inspect
from sqlalchemy.orm import Session, scoped_session

from .backends import Backend, create_backend
from .breaker import CircuitBreaker
from .codec import Adopter, Codec
from .errors import ConfigurationError
from .memoize import AsyncMemoized, Memoized, MergeTarget
from .protocol import NAMESPACE_TAG, Guard, ReadContext
from .stats import Stats, StatsSnapshot

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["Cache"]

P = ParamSpec("P")
R = TypeVar("R")

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class Cache:
    """Caching for SQLAlchemy ORM results.

    ``Cache()`` is the embedded default: an in-process LRU with TTL, nothing to install.
    ``Cache("redis://127.0.0.1:6379/0", namespace="app")`` shares entries across
    processes. ``attach()`` the cache to your sessions or engine so that reads are tracked
    and every commit invalidates what it changed.

    ``strict=True`` raises :class:`~ormcache.UncacheableValueError` for values that cannot
    be cached (use it in tests); otherwise such values are served uncached and logged
    once. ``stampede_lock`` makes concurrent misses on one key compute once (single-flight
    in the process, a lock in the backend across processes, waits bounded by
    ``lock_wait``). ``secret`` HMAC-signs payloads, so entries written by anyone without the secret
    are rejected. Timeouts bound what a slow backend can add to a call, and after
    ``breaker_threshold`` consecutive failures the backend is skipped for
    ``breaker_cooldown`` seconds.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str = "ormcache",
        default_ttl: float | None = 300.0,
        strict: bool = False,
        secret: str | bytes | None = None,
        lease_ttl: float = 5.0,
        connect_timeout: float = 0.25,
        socket_timeout: float = 0.25,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 5.0,
        max_entries: int = 10_000,
        stampede_lock: bool = True,
        lock_wait: float = 5.0,
        lock_ttl: float = 30.0,
        backend: Backend | None = None,
    ) -> None:
        self._memoized: list[Memoized[Any, Any]] = []
        self._attached_scoped: scoped_session[Any] | None = None
        self.tracks_loads = False
        self._settings: dict[str, Any] = {
            "url": url,
            "namespace": namespace,
            "default_ttl": default_ttl,
            "strict": strict,
            "secret": secret,
            "lease_ttl": lease_ttl,
            "connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
            "breaker_threshold": breaker_threshold,
            "breaker_cooldown": breaker_cooldown,
            "max_entries": max_entries,
            "stampede_lock": stampede_lock,
            "lock_wait": lock_wait,
            "lock_ttl": lock_ttl,
            "backend": backend,
        }
        self._build()

    def configure(self, **changes: Any) -> None:
        """Change settings (the constructor's keyword arguments) and rebuild the backend.

        ``init_app`` uses this to apply ``app.config``; arguments not named keep their
        current values.
        """
        unknown = set(changes) - set(self._settings)
        if unknown:
            raise ConfigurationError(
                f"Cache.configure() got unknown settings {sorted(unknown)}; "
                f"valid ones are {sorted(self._settings)}"
            )
        if "url" in changes and "backend" not in changes:
            changes["backend"] = None
        old_backend = getattr(self, "backend", None)
        self._settings.update(changes)
        self._build()
        if old_backend is not None and old_backend is not self.backend:
            old_backend.close()

    def _build(self) -> None:
        cfg = self._settings
        namespace: str = cfg["namespace"]
        if not _NAMESPACE_RE.match(namespace):
            raise ConfigurationError(
                f"namespace {namespace!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . -"
            )
        default_ttl = cfg["default_ttl"]
        if default_ttl is not None and default_ttl <= 0:
            raise ConfigurationError(
                f"default_ttl must be positive seconds or None (no expiry), got {default_ttl!r}"
            )
        lease_ttl = float(cfg["lease_ttl"])
        if lease_ttl <= 0:
            raise ConfigurationError(f"lease_ttl must be positive seconds, got {lease_ttl!r}")
        self.url: str = cfg["url"] or "memory://"
        self.namespace = namespace
        self.default_ttl: float | None = default_ttl
        self.strict: bool = cfg["strict"]
        self.lease_ttl = lease_ttl
        self.stampede_lock: bool = bool(cfg["stampede_lock"])
        self.lock_wait = float(cfg["lock_wait"])
        self.lock_ttl = float(cfg["lock_ttl"])
        if self.lock_wait < 0 or self.lock_ttl <= 0:
            raise ConfigurationError(
                "lock_wait must be >= 0 and lock_ttl > 0 seconds; lock_ttl should exceed your "
                "slowest computation"
            )
        secret = cfg["secret"]
        key = secret.encode() if isinstance(secret, str) else secret
        old_codec = getattr(self, "codec", None)
        self.codec = Codec(secret=key or None)
        if old_codec is not None:
            self.codec.adopt_registrations(old_codec)
        backend: Backend | None = cfg["backend"]
        if backend is None:
            options: dict[str, Any]
            if self.url.startswith("memory"):
                options = {"max_entries": cfg["max_entries"]}
            else:
                options = {
                    "socket_timeout": cfg["socket_timeout"],
                    "connect_timeout": cfg["connect_timeout"],
                }
            backend = create_backend(self.url, namespace, **options)
        self.backend: Backend = backend
        self.stats_counters = Stats()
        self.breaker = CircuitBreaker(
            threshold=cfg["breaker_threshold"], cooldown=cfg["breaker_cooldown"]
        )
        self.guard = Guard(backend, self.stats_counters, self.breaker)
        for memoized in self._memoized:
            memoized.rebind()

    # -- memoize ----------------------------------------------------------------------
    @overload
    def memoize(self, fn: Callable[P, R], /) -> Memoized[P, R]: ...

    @overload
    def memoize(
        self,
        fn: None = None,
        /,
        *,
        ttl: float | None = ...,
        timeout: float | None = ...,
        negative_ttl: float | None = ...,
        stale_ttl: float | None = ...,
        early_refresh: float | None = ...,
        strict: bool | None = ...,
        merge: MergeTarget = ...,
        ignore: Collection[str] = ...,
        version: str | int | None = ...,
    ) -> Callable[[Callable[P, R]], Memoized[P, R]]: ...

    def memoize(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        ttl: float | None = None,
        timeout: float | None = None,
        negative_ttl: float | None = None,
        stale_ttl: float | None = None,
        early_refresh: float | None = None,
        strict: bool | None = None,
        merge: MergeTarget = False,
        ignore: Collection[str] = (),
        version: str | int | None = None,
    ) -> Memoized[P, R] | Callable[[Callable[P, R]], Memoized[P, R]]:
        """Cache ``fn``'s results per arguments.

        ``ttl`` (``timeout`` is flask-caching's spelling of it) bounds staleness only for
        writes ormcache cannot see; commits through an attached session invalidate at once.
        ``negative_ttl`` applies instead when the result is None (an unknown key), so a
        flood of random keys cannot fill the cache for long; a commit that creates the row
        invalidates such an entry at once either way.
        ``stale_ttl`` serves an entry for that long past its TTL while one caller refreshes
        it in the background (never an entry a commit invalidated). ``early_refresh``
        (XFetch's beta, 1.0 is typical) recomputes shortly before expiry, at random, so a
        hot key never expires for everyone at once.
        ``merge`` merges hits into a session, so they behave as instances loaded there.
        ``ignore`` lists parameters that do not affect the result; sessions and
        connections are always ignored. Bump ``version`` when the return shape changes.
        """
        if ttl is not None and timeout is not None and ttl != timeout:
            raise ConfigurationError(
                "memoize() got both ttl and timeout with different values; timeout is "
                "only an alias of ttl for flask-caching users, pass one of them"
            )
        chosen = ttl if ttl is not None else timeout
        if chosen is not None and chosen <= 0:
            raise ConfigurationError(f"memoize ttl must be positive seconds, got {chosen!r}")

        def decorate(func: Callable[P, R]) -> Memoized[P, R]:
            kind = AsyncMemoized if iscoroutinefunction(func) else Memoized
            memoized = kind(
                self,
                func,
                ttl=chosen if chosen is not None else self.default_ttl,
                negative_ttl=negative_ttl,
                stale_ttl=stale_ttl,
                early_refresh=early_refresh,
                strict=self.strict if strict is None else strict,
                merge=merge,
                ignore=ignore,
                version=version,
            )
            self._memoized.append(memoized)
            return memoized

        return decorate(fn) if fn is not None else decorate

    def delete_memoized(self, fn: Memoized[..., Any], *args: Any, **kwargs: Any) -> None:
        """flask-caching's spelling of ``fn.invalidate(*args, **kwargs)``."""
        if not isinstance(fn, Memoized):
            raise ConfigurationError(
                f"delete_memoized() needs a function decorated with this cache's memoize, "
                f"got {fn!r}"
            )
        fn.invalidate(*args, **kwargs)

    # -- invalidation -----------------------------------------------------------------
    def invalidate(self, *targets: object) -> None:
        """Invalidate everything that read a model's tables, a row, or a ``Table``.

        ``cache.invalidate(User)`` bumps the table; ``cache.invalidate(user)`` bumps that
        row and the equality partitions it belongs to. Use it after writes ormcache cannot
        see (another application, a stored procedure).
        """
        from .sqla import tags

        bump: set[str] = set()
        for target in targets:
            bump.update(tags.tags_for_target(target, self.codec.hash_salt))
        self.guard.bump(sorted(bump))

    def clear(self) -> None:
        """Drop every entry in this namespace (other namespaces are untouched)."""
        self.guard.clear()
        self.guard.bump([NAMESPACE_TAG])

    def stats(self) -> StatsSnapshot:
        """Hits, misses, stores, invalidations, errors and more, since creation."""
        return self.stats_counters.snapshot()

    def close(self) -> None:
        self.backend.close()

    # -- SQLAlchemy integration -------------------------------------------------------
    def attach(self, target: object) -> None:
        """Track reads and writes of a Session class, sessionmaker, scoped_session or Engine.

        After this, queries inside memoized functions tag their entries, ``FromCache``
        works, and every commit (ORM flush, ORM bulk DML, Core DML, ``text()`` DML)
        invalidates what it wrote before ``commit()`` returns.
        """
        from . import orm

        if isinstance(target, scoped_session):
            self._attached_scoped = target
        orm.attach(self, target)
        self.tracks_loads = True

    def adopter(self, merge: MergeTarget) -> Adopter | None:
        """Where a memoize hit decodes its instances into (see ``Codec.decode``): the
        session ``memoize(merge=...)`` names, if there is one now, so a hit builds each
        instance once, straight into it."""
        from . import orm

        session: Session | None = None
        if merge is True:
            scoped = self._attached_scoped
            session = None if scoped is None else scoped()
        elif callable(merge):
            session = merge()
        return None if session is None else orm.SessionAdopter(session)

    def stale_instance(self, instances: Iterable[object], ctx: ReadContext) -> str | None:
        """The first persistent instance not loaded during ``ctx``, described, or None."""
        for obj in instances:
            state: Any = inspect(obj)
            if state.key is not None and state not in ctx.loaded:
                return f"{type(obj).__name__}{state.key[1]!r}"
        return None

    # -- Flask ------------------------------------------------------------------------
    def init_app(self, app: Flask) -> None:
        """Configure from ``app.config["ORMCACHE_*"]`` and register in ``app.extensions``."""
        from .flask import init_app

        init_app(self, app)
