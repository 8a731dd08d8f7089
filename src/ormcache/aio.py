"""asyncio: the same cache, driven through SQLAlchemy's greenlet bridge.

SQLAlchemy runs an ``AsyncSession``'s ORM work (and so every ormcache hook) as plain
sync code inside a greenlet, and its async drivers get their I/O done with
``await_only``: the greenlet hands a coroutine to the event loop and resumes with the
result. ormcache does the same. Under an ``AsyncSession``, and inside an ``async def``
memoized function (run through ``greenlet_spawn``), backend calls go to a
``redis.asyncio`` client through :class:`AwaitingRedis`, so the event loop never blocks
on a socket, while the protocol, the codec and the key logic stay one implementation,
tested once. Outside such a greenlet nothing changes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from sqlalchemy.util.concurrency import await_only, greenlet_spawn

__all__ = [
    "AwaitingCluster",
    "AwaitingRedis",
    "LoopTwins",
    "await_only",
    "greenlet_spawn",
    "in_bridge",
    "pause",
    "wait_for",
]

try:
    from greenlet import getcurrent as _getcurrent  # type: ignore[import-untyped,unused-ignore]
except ImportError:  # pragma: no cover - greenlet comes with the asyncio extra
    _getcurrent = None


def in_bridge() -> bool:
    """True inside a greenlet that can ``await_only``: an AsyncSession's ORM work, or an
    async memoized function's lookup. SQLAlchemy marks those greenlets."""
    return _getcurrent is not None and bool(
        getattr(_getcurrent(), "__sqlalchemy_greenlet_provider__", False)
    )


B = TypeVar("B")


class LoopTwins(Generic[B]):
    """A backend's twins, one per event loop: asyncio clients belong to the loop that
    made them. Without a factory (a backend built from a client, not a URL) the backend
    serves every loop itself, synchronously."""

    def __init__(self) -> None:
        self.factory: Callable[[], B] | None = None
        # Not weak: a twin's connections refer to their loop, so a weak key would never
        # be freed anyway. Twins of closed loops are dropped when a new loop arrives
        # (code that calls asyncio.run() per job makes one loop per job).
        self._twins: dict[asyncio.AbstractEventLoop, B] = {}
        self._lock = threading.Lock()

    def get(self, owner: B) -> B:
        if self.factory is None:
            return owner
        loop = asyncio.get_running_loop()
        twin = self._twins.get(loop)
        if twin is None:
            with self._lock:
                for old in [lp for lp in self._twins if lp.is_closed()]:
                    del self._twins[old]
                twin = self._twins[loop] = self.factory()
        return twin

    def __len__(self) -> int:
        return len(self._twins)


def pause(seconds: float) -> None:
    """``time.sleep`` that, on the event loop, lets other tasks run (a leader computing
    the value this caller waits for may be one of them)."""
    if in_bridge():
        await_only(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


def wait_for(event: threading.Event, timeout: float) -> None:
    """``event.wait(timeout)``; on the event loop it polls instead of blocking the loop
    that the setter of ``event`` needs."""
    if not in_bridge():
        event.wait(timeout)
        return
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not event.is_set() and time.monotonic() < deadline:
        await_only(asyncio.sleep(delay))
        delay = min(delay * 2, 0.02)


class AwaitingRedis:
    """A ``redis.asyncio`` client that looks synchronous to code running in the bridge:
    each command's coroutine is awaited with ``await_only``. Only what the backends use
    is covered; the backend code itself is shared with the synchronous client."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.connection_pool = client.connection_pool

    def execute_command(self, *args: Any, **options: Any) -> Any:
        return await_only(self._client.execute_command(*args, **options))

    def set(self, *args: Any, **kwargs: Any) -> Any:
        return await_only(self._client.set(*args, **kwargs))

    def unlink(self, *names: Any) -> Any:
        return await_only(self._client.unlink(*names))

    def eval(self, *args: Any) -> Any:
        return await_only(self._client.eval(*args))

    def register_script(self, script: str) -> _AwaitingScript:
        return _AwaitingScript(self._client.register_script(script))

    def pipeline(self, transaction: bool = True) -> _AwaitingPipeline:
        return _AwaitingPipeline(self._client.pipeline(transaction=transaction))

    def scan_iter(self, match: str, count: int) -> Iterator[bytes]:
        iterator = self._client.scan_iter(match=match, count=count).__aiter__()
        while True:
            try:
                yield await_only(iterator.__anext__())
            except StopAsyncIteration:
                return

    def close(self) -> None:
        if in_bridge():
            await_only(self._client.aclose())


class _AwaitingScript:
    def __init__(self, script: Any) -> None:
        self._script = script
        self.sha = script.sha
        self.script = script.script

    def __call__(self, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        return await_only(self._script(keys=keys, args=args))


class _AwaitingPipeline:
    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def __enter__(self) -> _AwaitingPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        await_only(self._pipe.reset())

    def eval(self, *args: Any) -> None:
        self._pipe.eval(*args)

    def execute_command(self, *args: Any) -> None:
        self._pipe.execute_command(*args)

    def execute(self) -> list[Any]:
        return await_only(self._pipe.execute())


class AwaitingCluster:
    """``redis.asyncio.cluster.RedisCluster`` behind the calls the Cluster backend makes,
    each awaited with ``await_only`` (see :class:`AwaitingRedis`)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def keyslot(self, key: Any) -> int:
        return int(self._client.keyslot(key))

    def get(self, name: Any) -> Any:
        return await_only(self._client.get(name))

    def set(self, *args: Any, **kwargs: Any) -> Any:
        return await_only(self._client.set(*args, **kwargs))

    def eval(self, *args: Any) -> Any:
        return await_only(self._client.eval(*args))

    def pipeline(self) -> _AwaitingClusterPipeline:
        return _AwaitingClusterPipeline(self._client.pipeline())

    def ping_primaries(self) -> None:
        """A ``PING`` to every primary, concurrently (the Cluster backend's fence: the
        sync client's per-node connections have no asyncio counterpart here)."""
        client = self._client

        async def run() -> None:
            await client.initialize()  # until then it knows no nodes, and would ping none
            primaries = client.get_primaries()
            if not primaries:
                raise ConnectionError("the cluster reports no primary to fence")
            await asyncio.gather(
                *(client.execute_command("PING", target_nodes=node) for node in primaries)
            )

        await_only(run())

    def close(self) -> None:
        if in_bridge():
            await_only(self._client.aclose())


class _AwaitingClusterPipeline:
    """Commands queue synchronously on the asyncio pipeline; only ``execute`` awaits."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        return await_only(self._pipe.execute(raise_on_error=raise_on_error))
