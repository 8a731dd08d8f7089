"""What every Redis topology shares: the entry format, the Lua scripts, the known tags,
locks, clearing, the per-event-loop twins and how a URL becomes a connected backend.

Key layout, all under the namespace: ``{ns}:e:{key}`` entries and ``{ns}:k:{key}``
computation locks everywhere; generations (decimal strings) and leases (a sorted set of
token → expiry in ms, by the server's clock) per tag, where each variant decides the
key names (a Cluster must put a tag's two keys in one slot).

An entry's value is ``b"OCE1"``, a 2-byte header length, the header (``tag\\ngen\\n`` per
tag) and the payload. A hit is served only if every generation the header recorded is
still the current one.

The variants (:mod:`.standalone`, :mod:`.sentinel`, :mod:`.cluster`) subclass
:class:`RedisCore` and override how they connect (:meth:`RedisCore.endpoint`) and the
protocol steps whose atomicity depends on the topology.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from ormcache.aio import LoopTwins
from ormcache.backends.base import UNREADABLE, Entry, Snapshot
from ormcache.errors import BackendError

from .errors import run_redis

__all__ = [
    "ACQUIRE",
    "BOOT",
    "BUMP",
    "GENERATION_TTL",
    "RELEASE",
    "SNAPSHOT",
    "Endpoint",
    "KnownTags",
    "RedisCore",
    "check_boot_on_connect",
    "check_tag",
    "frame_entry",
    "fresh_generation",
    "is_current",
    "keep_ms",
    "lua",
    "no_retry",
    "parse_entry",
    "timeouts",
    "unframed",
    "wrong_type",
]

T = TypeVar("T")
B = TypeVar("B", bound="RedisCore")

ENTRY_MAGIC = b"OCE1"
#: Seconds a generation lives when no stored entry needs it (created by a snapshot or a
#: bump): long enough for a computation between its snapshot and its store (one that
#: takes longer only loses its store). A store extends its tags' generations to outlive
#: the entry by this much, so a generation never outlives what needs it by much more.
GENERATION_TTL = 60.0
MAX_HEADER = 65535


def lua(*names: str) -> str:
    """The scripts ``lua/{name}.lua`` joined, in order: a script that calls a shared
    function (``leased``, ``bump``) is loaded after the file defining it."""
    folder = resources.files("ormcache.backends.redis").joinpath("lua")
    return "".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)


# gen.lua defines usable() and failed(), which the other helpers use.
SNAPSHOT = lua("gen", "leased", "snapshot")
BUMP = lua("gen", "bump_fn", "bump")
ACQUIRE = lua("gen", "bump_fn", "acquire")
RELEASE = lua("gen", "bump_fn", "release")
BOOT = lua("gen", "bump_fn", "boot")
LOCK = lua("lock")
UNLOCK = lua("unlock")


def frame_entry(snapshot: Snapshot, payload: bytes) -> bytes | None:
    """The stored form of ``payload`` read under ``snapshot``; None if the header would
    not fit its 2-byte length (the value then goes uncached)."""
    header = b"".join(f"{t}\n{g}\n".encode() for t, g in zip(snapshot.tags, snapshot.gens))
    if len(header) > MAX_HEADER:
        return None
    return ENTRY_MAGIC + len(header).to_bytes(2, "big") + header + payload


def parse_entry(value: Any) -> Entry | None:
    """Split a stored entry into payload, tags and recorded generations; None if it is
    not one (any other value under an entry key is a miss)."""
    if not isinstance(value, bytes) or len(value) < 6 or value[:4] != ENTRY_MAGIC:
        return None
    length = int.from_bytes(value[4:6], "big")
    if len(value) < 6 + length:
        return None
    lines = value[6 : 6 + length].split(b"\n")
    if lines[-1] != b"" or len(lines) % 2 != 1:
        return None
    gens = tuple(lines[1:-1:2])
    # We record only decimal generations; anything else was not written by us.
    if not all(g.isdigit() for g in gens):
        return None
    try:
        tags = tuple(t.decode("utf-8") for t in lines[0:-1:2])
    except UnicodeDecodeError:
        return None
    return Entry(value[6 + length :], tags, gens)


def unframed(value: Any) -> Entry | None:
    """What ``get`` returns for a value under an entry key that is not a (current)
    entry: ``None`` when there is none, :data:`~ormcache.backends.base.UNREADABLE` when
    there is something else there, so that the read path deletes it as corrupt."""
    return None if value is None else UNREADABLE


def keep_ms(ttl: float | None, generation_ttl: float) -> str:
    """How long a stored entry's generations must live at least, and how long they are
    made to live when they must be extended, in ms (``"need:upto"``; ``"0"`` for an entry
    without a TTL, whose generations then persist until a bump or an eviction).

    The need is the entry's TTL plus the generation TTL; an extension goes one more
    generation TTL beyond it. So a generation outlives what needs it by at most two
    generation TTLs, and the stores of one key's entries extend it (which Redis pushes to
    every near cache as a change) at most once per generation TTL, not on every store.
    """
    if ttl is None:
        return "0"
    need = max(1, int((ttl + generation_ttl) * 1000))
    return f"{need}:{need + max(1, int(generation_ttl * 1000))}"


def wrong_type(exc: BaseException) -> bool:
    """Whether a reply error says the key holds another Redis type than the command's."""
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def is_current(recorded: Sequence[object], current: Sequence[Any]) -> bool:
    """Whether every generation an entry recorded is still the current one. A missing
    generation (None) never matches, so an evicted or flushed tag cannot revive it."""
    return list(recorded) == list(current)


def fresh_generation() -> int:
    """Where a missing generation restarts: random, so that it cannot equal a value an
    old entry recorded before the key vanished (INCR would restart at 1)."""
    return secrets.randbits(62)


def check_tag(tag: str) -> str:
    """Tags name tables and columns, in any script (keys and headers are UTF-8). Only a
    newline, the header's separator, cannot be stored: such a read or write then goes
    uncached, like any other backend failure, instead of failing the caller."""
    if "\n" in tag:
        raise BackendError(f"a table or column name with a newline cannot be a tag: {tag!r}")
    return tag


class KnownTags(dict[str, tuple[str, ...]]):
    """Entry key → its tags, as this process last stored or read it. Knowing an entry's
    tags lets a hit read the entry and its generations in one plain batch instead of a
    script. Bounded: emptied when full (a forgotten entry costs one script read)."""

    LIMIT = 100_000

    def learn(self, key: str, tags: tuple[str, ...]) -> None:
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = tags


def timeouts(socket_timeout: float, connect_timeout: float) -> dict[str, float]:
    """Client keywords for the timeouts, which default low: a cache that waits seconds
    for Redis is an outage."""
    return {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}


def no_retry(*, aio: bool) -> Any:
    """A client ``retry`` that never retries: each retry would add another timeout to a
    request. (A Cluster client still follows redirections after a resharding.)"""
    if aio:
        from redis.asyncio.retry import Retry as AsyncRetry

        return AsyncRetry(NoBackoff(), 0)
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def check_boot_on_connect(client: Any, boot_key: str, namespace_gen: str, gen_ttl_ms: str) -> None:
    """Run ``boot.lua`` on every connection ``client`` makes, after its handshake and
    before its first command.

    Generations only ever move forward while Redis runs, but a server restarted from an
    RDB snapshot or an AOF that missed its last second comes back with the generations
    of that moment: entries that later bumps invalidated match them again. No one
    process sees every restart, but every process reconnects after one, so the check
    sits where each connection is made: the first after a restart bumps the namespace,
    before anything is read on it. (Redis Cluster: not covered; see the README.)

    A client passed in may already have a connect hook (another namespace's check, the
    application's own): it runs first. Its existing connections take the check too, and
    the idle ones reconnect through it.
    """
    pool = client.connection_pool
    keys = (boot_key, namespace_gen)
    previous = pool.connection_kwargs.get("redis_connect_func")
    hook: Callable[[Any], Any]
    if inspect.iscoroutinefunction(pool.connection_class.on_connect):

        async def check_async(conn: Any) -> None:
            if previous is None:
                await conn.on_connect()
            elif inspect.iscoroutinefunction(previous):
                await previous(conn)
            else:
                previous(conn)
            await conn.send_command("EVAL", BOOT, 2, *keys, fresh_generation(), gen_ttl_ms)
            await conn.read_response()

        hook = check_async
    else:

        def check(conn: Any) -> None:
            if previous is None:
                conn.on_connect()
            else:
                previous(conn)
            conn.send_command("EVAL", BOOT, 2, *keys, fresh_generation(), gen_ttl_ms)
            conn.read_response()

        hook = check
    pool.connection_kwargs["redis_connect_func"] = hook
    idle = list(getattr(pool, "_available_connections", ()))
    for conn in [*idle, *getattr(pool, "_in_use_connections", ())]:
        conn.redis_connect_func = hook
    if not inspect.iscoroutinefunction(getattr(pool.connection_class, "disconnect", None)):
        for conn in idle:  # an asyncio client's are new: ormcache made it
            conn.disconnect()


@dataclass(frozen=True)
class Endpoint:
    """How the deployment a URL names is reached, worked out once per URL.

    ``connect(aio)`` makes the client the variant's constructor takes: redis-py's
    synchronous one, or (``aio``) an asyncio one wrapped for the greenlet bridge.
    ``options`` are further constructor keywords of the variant.
    """

    where: str
    connect: Callable[[bool], Any]
    options: dict[str, Any] = field(default_factory=dict)


class RedisCore:
    """The parts of the :class:`~ormcache.backends.base.Backend` protocol that do not
    depend on the topology. Not a backend by itself: the variants add the protocol."""

    def __init__(self, client: Any, namespace: str, *, generation_ttl: float, where: str) -> None:
        self._client = client
        self.namespace = namespace
        self.where = where
        self._gen_ttl_ms = str(int(generation_ttl * 1000))
        self._gen_ttl = generation_ttl
        self._e = f"{namespace}:e:"
        self._k = f"{namespace}:k:"
        self._known = KnownTags()
        self._twins: LoopTwins[Any] = LoopTwins()

    @property
    def client(self) -> Any:
        """The redis-py client (or its asyncio twin behind the bridge)."""
        return self._client

    @classmethod
    def endpoint(
        cls, url: str, socket_timeout: float, connect_timeout: float, options: dict[str, Any]
    ) -> Endpoint:
        """Check ``url`` and say how to connect to it; raises ``ConfigurationError``."""
        raise NotImplementedError

    @classmethod
    def from_url(
        cls: type[B],
        url: str,
        namespace: str,
        *,
        socket_timeout: float = 0.25,
        connect_timeout: float = 0.25,
        generation_ttl: float = GENERATION_TTL,
        **options: Any,
    ) -> B:
        """The backend for ``url``; ``options`` go to the redis-py client. On an event
        loop (see :mod:`ormcache.aio`) the same URL gets a ``redis.asyncio`` twin per
        loop, built the same way."""
        endpoint = cls.endpoint(url, socket_timeout, connect_timeout, options)

        def build(aio: bool) -> B:
            return cls(
                endpoint.connect(aio),
                namespace,
                generation_ttl=generation_ttl,
                where=endpoint.where,
                **endpoint.options,
            )

        backend = build(False)
        backend._twins.factory = lambda: build(True)
        return backend

    def for_event_loop(self: B) -> B:
        """This backend as the running event loop should use it: the ``redis.asyncio``
        twin made for that loop (asyncio clients belong to one loop), or itself when it
        was built from a client rather than a URL."""
        twin: B = self._twins.get(self)
        return twin

    def _run(self, what: str, call: Callable[[], T]) -> T:
        return run_redis(self.where, what, call)

    def entry_name(self, key: str) -> str:
        """The Redis key of the entry ``key`` (what a tracking push names)."""
        return self._e + key

    def fence(self) -> None:
        """One more round trip after an invalidation: Redis has written the
        invalidation's tracking pushes into every socket before it answers a later
        command (see :mod:`ormcache.backends.near`)."""
        self._run("fence", lambda: self.client.execute_command("PING"))

    def _clear_patterns(self) -> Sequence[str]:
        """SCAN patterns of the entry and generation keys, which :meth:`clear` deletes."""
        raise NotImplementedError

    def _nodes(self) -> Iterable[Any]:
        """The clients :meth:`clear` scans: every primary."""
        return (self.client,)

    def lock(self, key: str, token: str, ttl: float) -> bool:
        ms = max(1, int(ttl * 1000))
        return bool(self._run("lock", lambda: self.client.eval(LOCK, 1, self._k + key, token, ms)))

    def unlock(self, key: str, token: str) -> None:
        self._run("unlock", lambda: self.client.eval(UNLOCK, 1, self._k + key, token))

    def clear(self) -> None:
        """Delete this namespace's entries and generations on every primary, in batches
        (SCAN + UNLINK, never FLUSHDB). Leases stay: a writer mid-commit must still block
        stores."""

        def run() -> None:
            for node in self._nodes():
                for pattern in self._clear_patterns():
                    batch: list[bytes] = []
                    for name in node.scan_iter(match=pattern, count=1000):
                        batch.append(name)
                        if len(batch) >= 1000:
                            _unlink(node, batch)
                            batch.clear()
                    _unlink(node, batch)

        self._run("clear", run)


def _unlink(node: Any, names: list[bytes]) -> None:
    """One key per UNLINK, pipelined: on a Cluster node the keys may span slots."""
    if names:
        with node.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.execute_command("UNLINK", name)
            pipe.execute()
