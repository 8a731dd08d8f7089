"""``Cache``: the one front object over codec, protocol and backend."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Iterable
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from sqlalchemy import Table
from sqlalchemy.orm import Session, scoped_session

from .backends import Backend
from .backends.base import redact_url
from .codec import Adopter
from .core import Core, Settings
from .errors import BackendError, ConfigurationError
from .identity import Registry, identify
from .memoize import AsyncMemoized, Memoized, MemoizedClassMethod, MergeTarget
from .protocol import NAMESPACE_TAG
from .readpath import ReadPath
from .stats import StatsSnapshot

if TYPE_CHECKING:
    from flask import Flask


__all__ = ["Cache"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class Cache:
    """Caching for SQLAlchemy ORM results.

    ``Cache()`` is the embedded default: an in-process LRU with TTL, nothing to install.
    ``Cache("redis://127.0.0.1:6379/0", namespace="app")`` shares entries across
    processes. ``attach()`` the cache to your sessions or engine so that reads are tracked
    and every commit invalidates what it changed.

    :param url: ``memory://`` (the default), ``redis://``, ``rediss://``,
        ``redis+sentinel://`` or ``redis+cluster://``; see the README for each form.
    :param namespace: prefix of every key; ``clear()`` touches only its own namespace.
    :param default_ttl: seconds an entry lives unless the call says otherwise (None: no
        expiry). It bounds staleness only for writes ormcache cannot see; commits through
        attached sessions invalidate at once.
    :param strict: raise :class:`~ormcache.UncacheableValueError` for values that cannot be
        cached (use it in tests); otherwise they are served uncached and logged once.
    :param secret: HMAC-sign payloads, so entries written by anyone without the secret
        are rejected, and key the hashes of argument values in key names.
    :param lease_ttl: how long a crashed writer's lease can block stores on its tags.
    :param connect_timeout: seconds to wait for a backend connection.
    :param socket_timeout: seconds to wait for a backend reply; with the breaker, this
        bounds what a slow or dead backend adds to a call.
    :param breaker_threshold: consecutive backend failures that open the circuit breaker.
    :param breaker_cooldown: seconds the backend is skipped once the breaker is open.
    :param max_entries: size of the in-process LRU (``memory://``), and of the near
        cache unless ``near_cache`` sets it.
    :param generation_ttl: seconds a generation key lives beyond the entries stored
        against it (Redis only); also the longest computation whose result is stored.
    :param max_bytes: bytes of payload the in-process LRU (``memory://``) or the near
        cache holds at most; the least recently used (near cache: oldest) go first.
    :param stampede_lock: concurrent misses on one key compute once (single-flight in the
        process, a backend lock across processes).
    :param lock_wait: seconds a waiter waits for another's computation before computing.
    :param lock_ttl: seconds after which a dead holder's computation lock expires; it
        should exceed your slowest computation.
    :param near_cache: keep recent Redis entries in process memory and serve hits from
        there while Redis's tracking pushes vouch that they are current (see the README,
        "Near cache"). None (the default) turns it on for ``redis://``, ``rediss://`` and
        ``redis+sentinel://``; False turns it off; a number sets its entry bound (else
        ``max_entries``; ``max_bytes`` bounds it too).
    :param backend: a ready :class:`~ormcache.Backend` instead of one built from ``url``.
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
        max_bytes: int = 64 * 2**20,
        generation_ttl: float = 60.0,
        stampede_lock: bool = True,
        lock_wait: float = 5.0,
        lock_ttl: float = 30.0,
        near_cache: bool | int | None = None,
        backend: Backend | None = None,
    ) -> None:
        settings = Settings(
            url=url,
            namespace=namespace,
            default_ttl=default_ttl,
            strict=strict,
            secret=secret,
            lease_ttl=lease_ttl,
            connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            max_entries=max_entries,
            max_bytes=max_bytes,
            generation_ttl=generation_ttl,
            stampede_lock=stampede_lock,
            lock_wait=lock_wait,
            lock_ttl=lock_ttl,
            near_cache=near_cache,
            backend=backend,
        )
        self._core = Core(settings)
        self._core.owner = self
        from .sqla.tracking import install_global_listeners

        install_global_listeners()
        self._reads = ReadPath(self._core)
        self._memoized: list[Memoized[Any, Any]] = []
        self._wiring: Any = None  # ormcache.sqla.tracking.Wiring, made on first attach()
        self._prefixes = Registry()
        self._attached_scoped: scoped_session[Any] | None = None
        #: (the application init_app configured us for, the settings before it, the
        #: settings it applied): a second application must ask for the same.
        self._flask: tuple[weakref.ref[Flask], Settings, Settings] | None = None

    # -- settings ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._core.settings.resolved_url

    @property
    def namespace(self) -> str:
        return self._core.namespace

    @property
    def default_ttl(self) -> float | None:
        return self._core.default_ttl

    @property
    def strict(self) -> bool:
        return self._core.strict

    @property
    def backend(self) -> Backend:
        """The backend in use (for administration; the paths go through a guard)."""
        return self._core.backend

    @property
    def bypassing(self) -> bool:
        """True while the circuit breaker skips the backend (calls go to the database)."""
        return self._core.guard.breaker.is_open

    def configure(self, **changes: Any) -> None:
        """Change settings (the constructor's keyword arguments) and rebuild the backend.

        ``init_app`` uses this to apply ``app.config``; arguments not named keep their
        current values. Counters, registered types and invalidations not yet delivered
        to the old backend are kept.
        """
        self._reconfigure(self._core.settings.changed(**changes))
        if self._flask is not None:
            app, base, _ = self._flask
            self._flask = (app, base, self._core.settings)

    def _reconfigure(self, settings: Settings) -> None:
        self._core.configure(settings)
        for memoized in self._memoized:
            memoized.rebind()

    def register_type(
        self,
        cls: type[T],
        *,
        name: str,
        encode: Callable[[T], Any],
        decode: Callable[[Any], T],
    ) -> None:
        """Make values of ``cls`` cacheable: ``encode`` turns one into a storable value
        (str, int, bytes, lists, dicts...) and ``decode`` rebuilds it. ``name`` goes into
        payloads instead of a class path, so decoding never imports anything; keep it
        stable across releases."""
        self._core.codec.register_type(cls, name=name, encode=encode, decode=decode)

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
        allow_time: bool = ...,
        name: str | None = ...,
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
        allow_time: bool = False,
        name: str | None = None,
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
        ``allow_time`` lets the function's queries call time functions (``now()``): a
        result up to ``ttl`` seconds old is then acceptable. Locking reads and other
        non-deterministic functions still make a result unstorable.

        Entries are keyed by the function's module and qualified name, which every
        process agrees on (see :mod:`ormcache.identity`). ``name`` replaces the qualified
        name: lambdas and callable objects need one, and so do functions that one factory
        makes with different values closed over, when those values cannot be described
        the same way in every process; a second, different function under a name this
        cache already gave out raises :class:`~ormcache.ConfigurationError` here, at
        decoration. The same function decorated again (an application factory run twice)
        shares its entries.

        Methods: memoized in a class body, ``obj.method(x)`` is keyed by ``obj`` too, so
        ``self`` must be keyable (an ORM instance is keyed by its identity) or listed in
        ``ignore=("self",)``; ``cls`` is keyed by the class's qualified name. Put
        ``@cache.memoize`` above or below ``@classmethod`` and ``@staticmethod``.
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
            wrapper: Any = None
            if isinstance(func, (classmethod, staticmethod)):
                wrapper, func = type(func), func.__func__
            identity = identify(func, name=name, version=version)
            kind = AsyncMemoized if iscoroutinefunction(func) else Memoized
            memoized = kind(
                self._core,
                self._reads,
                self._adopter,
                func,
                identity,
                ttl=chosen if chosen is not None else self._core.default_ttl,
                negative_ttl=negative_ttl,
                stale_ttl=stale_ttl,
                early_refresh=early_refresh,
                strict=self._core.strict if strict is None else strict,
                merge=merge,
                ignore=ignore,
                allow_time=allow_time,
            )
            self._prefixes.claim(identity)
            self._memoized.append(memoized)
            if wrapper is classmethod:
                return MemoizedClassMethod(memoized)  # type: ignore[return-value]
            if wrapper is staticmethod:
                return staticmethod(memoized)  # type: ignore[return-value]
            return memoized

        return decorate(fn) if fn is not None else decorate

    def delete_memoized(self, fn: Memoized[..., Any], *args: Any, **kwargs: Any) -> bool:
        """flask-caching's spelling of ``fn.invalidate(*args, **kwargs)``."""
        if not isinstance(fn, Memoized):
            raise ConfigurationError(
                f"delete_memoized() needs a function decorated with this cache's memoize, "
                f"got {fn!r}"
            )
        return fn.invalidate(*args, **kwargs)

    # -- invalidation -----------------------------------------------------------------
    def invalidate(self, *targets: object, raise_on_error: bool = False) -> bool:
        """Invalidate everything that read a model's tables, a row, or a ``Table``.

        ``cache.invalidate(User)`` bumps the table; ``cache.invalidate(user)`` bumps that
        row and the equality partitions it belongs to. Use it after writes ormcache cannot
        see (another application, a stored procedure).

        Returns True if the invalidation reached the backend now. If it did not (the
        backend is down), it is owed: this process serves no hits until it is delivered,
        but other processes may serve the old entries until their TTL. A script that must
        not go on in that case (a migration) passes ``raise_on_error=True`` and gets
        :class:`~ormcache.BackendError` instead of False.
        """
        from .sqla.tags import tags_for_target

        bump: set[str] = set()
        for target in targets:
            bump.update(tags_for_target(target, self._core.codec.hash_salt))
        delivered = self._core.guard.bump(sorted(bump))
        if not delivered and raise_on_error:
            what = ", ".join(map(_describe_target, targets))
            raise BackendError(_undelivered(f"invalidate({what})", self.url))
        return delivered

    def declare_writes(
        self, source: str | type | Table, *, writes: Iterable[str | type | Table]
    ) -> None:
        """Declare what the database writes on its own where its catalog cannot tell.

        ``cache.declare_writes("orders", writes=["audit_log"])``: every write to
        ``orders`` also writes ``audit_log`` (a trigger in C, one the database user may
        not see, or a write to another database). ``cache.declare_writes("touch()",
        writes=["users"])``: a call of the function or procedure ``touch`` writes
        ``users``, instead of the whole namespace; ``writes=[]`` declares that it writes
        nothing (a call is then neither a write nor cached). Names are
        ``Table.fullname`` values (``schema.table`` outside the default schema); Tables and
        mapped classes are accepted too. Declarations add to what the catalog shows, and
        for a routine they replace it.
        """
        from .sqla.tags import tags_for_target

        def names(target: str | type | Table) -> set[str]:
            if isinstance(target, str):
                return {target}
            return {t[2:] for t in tags_for_target(target) if t.startswith("t:")}

        if isinstance(source, str) and source.endswith("()"):
            sources = [source]
        else:
            sources = sorted(names(source))
        targets = {name for target in writes for name in names(target)}
        for name in sources:
            self._core.declared.declare(name, targets)

    def clear(self, *, raise_on_error: bool = False) -> bool:
        """Drop every entry in this namespace (other namespaces are untouched).

        Returns True if the backend was cleared now; ``raise_on_error=True`` raises
        :class:`~ormcache.BackendError` instead of returning False (see ``invalidate``).
        """
        swept = self._core.guard.clear()
        bumped = self._core.guard.bump([NAMESPACE_TAG])
        if not (swept and bumped) and raise_on_error:
            raise BackendError(_undelivered("clear()", self.url))
        return swept and bumped

    def stats(self) -> StatsSnapshot:
        """Hits, misses, stores, invalidations, errors and more, since creation."""
        return self._core.stats.snapshot()

    def close(self) -> None:
        """Detach from everything ``attach()`` reached and close the backend's connections
        (the cache is not usable afterwards): a closed cache must not go on taking leases
        on every commit of the engines it watched."""
        if self._wiring is not None:
            self._wiring.detach_all()
        self._core.guard.close()
        self._core.backend.close()

    # -- SQLAlchemy integration -------------------------------------------------------
    def attach(self, target: object) -> None:
        """Track reads and writes of a Session class, sessionmaker, scoped_session or Engine.

        After this, queries inside memoized functions tag their entries, ``FromCache``
        works, and every commit (ORM flush, ORM bulk DML, Core DML, ``text()`` DML)
        invalidates what it wrote before ``commit()`` returns. Attaching a target that is
        already attached does nothing (an application factory may run many times).
        """
        from .sqla.tracking import Wiring

        if isinstance(target, scoped_session):
            self._attached_scoped = target
        if self._wiring is None:
            self._wiring = Wiring(self._core, self._reads)
            self._core.preloaded = self._wiring.preloaded
            self._core.watching = self._wiring.watching
        self._wiring.attach(target)
        self._core.tracks_loads = True

    def detach(self, target: object) -> None:
        """Remove every listener ``attach(target)`` added; a target not attached is ignored."""
        if target is self._attached_scoped:
            self._attached_scoped = None
        if self._wiring is not None:
            self._wiring.detach(target)

    def _adopter(self, merge: MergeTarget) -> Adopter | None:
        """Where a memoize hit decodes its instances into (see ``Codec.decode``): the
        session ``memoize(merge=...)`` names, if there is one now, so a hit builds each
        instance once, straight into it."""
        from .sqla.loading import SessionAdopter

        session: Session | None = None
        if merge is True:
            scoped = self._attached_scoped
            session = None if scoped is None else scoped()
        elif callable(merge):
            session = merge()
        return None if session is None else SessionAdopter(session)

    # -- Flask ------------------------------------------------------------------------
    def init_app(self, app: Flask) -> None:
        """Configure from ``app.config["ORMCACHE_*"]`` and register in ``app.extensions``.

        A ``Cache`` holds one configuration. Another application may share it only with
        the same settings (re-initialising the same application may change them); one
        that asks for different settings raises :class:`~ormcache.ConfigurationError`,
        since applying them would reconfigure the cache under the first application.
        """
        import weakref

        from .flask import config_options, settings_conflict, warn_flask_caching_leftovers

        options = config_options(app)
        if self._flask is None:
            base = self._core.settings
        else:
            first, base, applied = self._flask
            wanted = base.changed(**options)
            if first() is not app and wanted != applied:
                raise ConfigurationError(settings_conflict(first(), app, applied, wanted))
        wanted = base.changed(**options)
        if wanted != self._core.settings:
            self._reconfigure(wanted)
        self._flask = (weakref.ref(app), base, self._core.settings)
        warn_flask_caching_leftovers(app, self.url)
        app.extensions["ormcache"] = self


def _describe_target(target: object) -> str:
    if isinstance(target, type):
        return target.__qualname__
    name = getattr(target, "fullname", None)  # a Table
    return name if isinstance(name, str) else f"a {type(target).__qualname__}"


def _undelivered(call: str, url: str) -> str:
    return (
        f"cache.{call} did not reach the cache backend at {redact_url(url)}; the bump is "
        "owed and will be delivered before this process serves another hit, but other "
        "processes may serve the old entries until their TTL. Check that the backend is "
        "running, then retry (or run `ormcache invalidate`)"
    )
