"""``@cache.memoize``: cache any function's result, invalidated by the data it read.

A memoized function is a :class:`~ormcache.readpath.Recipe`: it says what the key is
(the function and its hashed arguments) and how to compute, encode and decode the value.
The read path does the rest: while the function runs, every query it executes through an
attached session records the generations of what it read *before* reading, and the
result is stored with a compare-and-set against them, so a result computed from data that
a concurrent commit changed is never stored as current.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from .aio import await_only, greenlet_spawn
from .errors import UncacheableValueError
from .identity import FunctionIdentity
from .keys import ArgumentKeyer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .codec import Adopter
    from .core import Core
    from .readpath import ReadPath

__all__ = ["AsyncMemoized", "BoundMemoized", "Memoized", "MemoizedClassMethod", "MergeTarget"]

P = ParamSpec("P")
R = TypeVar("R")

#: ``merge=`` accepts True (the session the cache is attached to, if it is a
#: ``scoped_session``) or a callable returning the session to merge hits into.
MergeTarget = bool | Callable[[], "Session | None"]

#: Finds the session a hit decodes into, for a ``merge=`` target (given by ``Cache``).
AdopterFor = Callable[[MergeTarget], "Adopter | None"]

_Call = tuple[tuple[Any, ...], dict[str, Any]]


class Memoized(Generic[P, R]):
    """The memoized function: call it as the original; it also has ``invalidate``.

    Memoized in a class body, it binds like a method: ``obj.method(x)`` calls it with
    ``obj`` first, and ``obj.method.invalidate(x)`` drops that entry. ``self`` is then an
    argument like any other (see :class:`~ormcache.keys.ArgumentKeyer`).
    """

    tracked = True

    def __init__(
        self,
        core: Core,
        reads: ReadPath,
        adopter: AdopterFor,
        fn: Callable[P, R],
        identity: FunctionIdentity,
        *,
        ttl: float | None,
        negative_ttl: float | None = None,
        stale_ttl: float | None = None,
        early_refresh: float | None = None,
        strict: bool,
        merge: MergeTarget,
        ignore: Collection[str],
        allow_time: bool = False,
    ) -> None:
        self._core = core
        self._reads = reads
        self._adopter = adopter
        self._fn = fn
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_ttl = stale_ttl
        self.early_refresh = early_refresh
        self.strict = strict
        self.single_flight = True
        self.allow_time = allow_time
        self._merge = merge
        self.prefix = self.name = identity.prefix
        self._ignore = tuple(ignore)
        self._keyer = ArgumentKeyer(fn, self.prefix, core.codec, ignore)
        functools.update_wrapper(self, fn)

    # -- public -----------------------------------------------------------------------
    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Memoized[P, R]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> BoundMemoized[R]: ...

    def __get__(
        self, instance: object | None, owner: type | None = None
    ) -> Memoized[P, R] | BoundMemoized[R]:
        if instance is None:
            return self
        return BoundMemoized(self, instance)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            key = self._keyer(args, kwargs)
        except UncacheableValueError as exc:
            self._reads.uncacheable(self.prefix, exc, self.strict)
            return self._invoke(args, kwargs)
        return self._reads.run(self, key, (args, kwargs))

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop the entry for these arguments (the same binding rules as a call).

        Returns True if the backend dropped it now; otherwise the delete is owed, and this
        process serves no hits until it is delivered.
        """
        self._core.stats.incr("invalidations")
        return self._core.guard.delete([self._keyer(args, kwargs)])

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The backend key for these arguments; argument values appear only hashed."""
        return self._keyer(args, kwargs)

    def rebind(self) -> None:
        """Pick up a reconfigured cache's codec (``init_app`` after decoration)."""
        self._keyer = ArgumentKeyer(self._fn, self.prefix, self._core.codec, self._ignore)

    # -- the recipe ---------------------------------------------------------------------
    def tags(self, call: _Call) -> Sequence[str] | None:
        return None  # learned while computing, from the queries the function runs

    def tables(self, call: _Call) -> frozenset[str] | None:
        return None

    def compute(self, call: _Call) -> R:
        return self._invoke(*call)

    def encode(self, value: R, on_instance: Callable[[object], None]) -> bytes:
        return self._core.codec.encode(value, on_instance=on_instance)

    def decode(self, data: bytes, call: _Call) -> R:
        # Decided to serve it: a hit that merges decodes straight into the merge
        # session (only now, so a refused entry never reaches the session).
        into = None if self._merge is False else self._adopter(self._merge)
        return self._core.codec.decode(data, into=into)  # type: ignore[return-value]

    def loaded(self, value: R) -> Iterable[object]:
        return ()

    def _invoke(self, args: Any, kwargs: Any) -> R:
        return self._fn(*args, **kwargs)


class BoundMemoized(Generic[R]):
    """A memoized method bound to its instance (or a memoized classmethod to its class)."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, memoized: Memoized[..., R], instance: object) -> None:
        self.__func__ = memoized
        self.__self__ = instance

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.__func__(self.__self__, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        return self.__func__.invalidate(self.__self__, *args, **kwargs)

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        return self.__func__.cache_key(self.__self__, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__func__, name)

    def __repr__(self) -> str:
        return f"<bound memoized {self.__func__.prefix} of {self.__self__!r}>"


class MemoizedClassMethod(Generic[R]):
    """``@cache.memoize`` over ``@classmethod``: binds the class, as a classmethod does,
    the same way on every Python version."""

    def __init__(self, memoized: Memoized[..., R]) -> None:
        self.__func__ = memoized

    def __get__(self, instance: object | None, owner: type | None = None) -> BoundMemoized[R]:
        return BoundMemoized(self.__func__, owner if owner is not None else type(instance))


class AsyncMemoized(Memoized[P, R]):
    """A memoized ``async def``: calling it returns a coroutine, as the original does.

    The lookup, the computation and the store run as the synchronous implementation
    inside SQLAlchemy's greenlet bridge (``greenlet_spawn``): the function's coroutine
    and every backend round trip are awaited on the event loop, and waits for another
    task's computation yield to the loop instead of blocking it.
    """

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._acall(args, kwargs)  # type: ignore[return-value]

    async def _acall(self, args: Any, kwargs: Any) -> Any:
        return await greenlet_spawn(super().__call__, *args, **kwargs)

    def _invoke(self, args: Any, kwargs: Any) -> R:
        # In the bridge: the event loop runs the coroutine, and this greenlet resumes
        # with its result.
        return await_only(self._fn(*args, **kwargs))  # type: ignore[arg-type]
