"""The push channel behind the near cache: one RESP3 connection per process with
``CLIENT TRACKING on BCAST``, so that Redis tells this process about every change to a
key under the tracked prefixes (a generation bumped, expired, evicted or deleted; an
entry stored or deleted).

Why one connection of our own, read without blocking: RESP3 delivers the invalidation
pushes on the tracking connection itself, in order with that connection's replies, so
there is no second connection whose messages could overtake the first (the race Redis's
documentation describes for the RESP2 ``REDIRECT`` mode). A hit asks :meth:`current`,
which reads whatever the socket holds (one zero-timeout ``epoll_wait``, or ``poll``
where there is no epoll, when it holds nothing: a fraction of a microsecond) and applies
it before anything is served from memory.

When the channel's state is unknown, nothing is served from memory:

* until ``CLIENT TRACKING`` has answered OK on a fresh connection;
* after the connection closes or fails (Redis restarted, ``CLIENT KILL``, a network
  error), until a new one is set up; every local copy is dropped on both sides of that;
* when a health ping (``PING``, or ``ROLE`` behind Sentinel, which also notices a master
  demoted by a failover) is not answered within half the health interval; so a frozen or
  unreachable Redis stops near hits within one interval;
* when a drain reads a full buffer, the server may hold more pushes than the socket
  showed: a ``PING`` on this connection fences them (its reply comes after every push
  queued before it) before anything is served;
* in a forked child, until it made its own connection (the parent's socket is never
  read in the child).

On a Redis Cluster, :class:`~.cluster_tracking.ClusterChannel` keeps one such
connection per primary under one lock, and is off whenever any of them is, or the
cluster's topology differs from the one it was set up for.

A background thread sends the health pings and reconnects; it never serves anything.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import random
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = [
    "HEALTH_INTERVAL",
    "Background",
    "Listener",
    "Probe",
    "Readiness",
    "TrackingChannel",
    "track_forks",
]

logger = logging.getLogger("ormcache")

#: Seconds between health checks of the push channel; a ping unanswered for half of it
#: turns the near cache off until the channel is set up again.
HEALTH_INTERVAL = 1.0
_BUFFER = 1 << 16
#: Longest wait between set-up attempts of a push channel that keeps failing.
MAX_BACKOFF = 10.0


class Readiness:
    """Whether sockets have something to read: :meth:`now` without waiting (every hit
    asks; it returns ``(fd, event)`` pairs), :meth:`wait` up to a timeout (a fence).
    One socket for a channel, every member's for a Cluster's.

    epoll where the platform has it: ``poll`` hands the kernel its registrations on
    every call and epoll keeps them there, so epoll's zero-timeout check costs about
    half as much (0.27 against 0.45-0.9 µs here), and a near hit is mostly this check.
    Both are level-triggered, and both report a hang-up or an error whatever was asked.
    """

    __slots__ = ("_epoll", "_poll", "now")

    def __init__(self, *socks: Any) -> None:
        epoll = getattr(select, "epoll", None)
        self._epoll: Any = None
        self._poll: Any = None
        if epoll is not None:
            self._epoll = epoll(len(socks))
            for sock in socks:
                self._epoll.register(sock.fileno(), select.EPOLLIN)
            # At most one event per socket: the default sizes a buffer for 1023 every call.
            self.now: Callable[[], list[Any]] = functools.partial(self._epoll.poll, 0, len(socks))
        else:  # pragma: no cover - not on Linux
            self._poll = select.poll()
            for sock in socks:
                self._poll.register(sock, select.POLLIN)
            self.now = functools.partial(self._poll.poll, 0)

    def wait(self, seconds: float) -> bool:
        if self._epoll is not None:
            return bool(self._epoll.poll(seconds, 1))
        return bool(self._poll.poll(seconds * 1000))  # pragma: no cover - not on Linux

    def close(self) -> None:
        """Release the epoll descriptor (in a forked child: only the child's copy)."""
        if self._epoll is not None:
            self._epoll.close()


def _full_at(sock: Any) -> int:
    """Bytes read in one drain past which the socket's receive buffer may have filled, so
    that Redis may hold pushes it could not write yet (the drain then fences).

    The drain's own buffer (64 KiB) or half the kernel's receive buffer, whichever is
    smaller: the kernel counts its own overhead against ``SO_RCVBUF`` (it reports
    twice what was asked), and a small one (set low, or under memory pressure) fills
    long before 64 KiB arrive.
    """
    try:
        size = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    except (OSError, AttributeError):
        return _BUFFER
    return max(1, min(_BUFFER, size // 2))


def _frame(command: Sequence[bytes]) -> bytes:
    """``command`` as a RESP request (an array of bulk strings)."""
    return b"*%d\r\n" % len(command) + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in command
    )


class Listener(Protocol):
    """What the channel tells (always while holding :attr:`TrackingChannel.lock`)."""

    def invalidated(self, names: Sequence[bytes] | None) -> None:
        """These keys changed (None: every key, as after ``FLUSHALL``)."""

    def reset(self) -> None:
        """The channel went down or came up: nothing known locally can be trusted."""


#: A health probe: the command sent instead of ``PING``, and a check of its reply that
#: returns why the channel can no longer be trusted (None: all is well). Called with the
#: channel's lock held.
Probe = tuple[tuple[bytes, ...], Callable[[Any], "str | None"]]

_PING: tuple[bytes, ...] = (b"PING",)


def _still_master(reply: Any) -> str | None:
    if type(reply) is list and reply and reply[0] == b"master":
        return None
    return "the server is no longer the master (a failover)"


class Background:
    """The health thread's life cycle, shared by one channel and a cluster's set of them:
    started on demand by a hit that finds the channel down, stopped by ``close()``, never
    inherited by a forked child."""

    lock: threading.Lock
    interval: float
    where: str
    _up: bool

    @property
    def up(self) -> bool:
        """Whether memory may serve (:meth:`current` also applies pending pushes)."""
        return self._up

    def _init_background(self, *, own_life: bool = True) -> None:
        """``own_life``: not a member of a cluster channel (which handles its forks)."""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._pid = os.getpid()
        self._last_reason = ""
        #: Seconds to wait before the next set-up after failed ones (0: none failed).
        self._backoff = 0.0
        if own_life:
            track_forks(self)

    def _setup_failed(self, exc: Exception) -> None:
        """Remember (and log once) why the channel could not be set up, and wait longer
        before the next try: a server that keeps refusing (an ACL without ``CLIENT``, a
        server down for long) must not get a new connection every half interval from
        every process for good."""
        with self.lock:
            reason = f"cannot set up the push channel ({exc})"
            if reason != self._last_reason:
                logger.warning("ormcache: near cache off: %s: %s", self.where, reason)
            self._last_reason = reason
            # Jittered, so that the workers of a fleet do not all come back at once.
            grown = min(max(2 * self._backoff, self.interval), MAX_BACKOFF)
            self._backoff = grown * random.uniform(0.75, 1.25)

    def _setup_done(self) -> None:
        """The channel is up (lock held): the next failure starts the backoff afresh."""
        self._backoff = 0.0

    def _step(self) -> None:
        """One health step: set up what is down, check what is up (lock not held)."""
        raise NotImplementedError

    def _forked(self) -> None:
        """In a forked child: drop the parent's sockets unread, start afresh."""
        raise NotImplementedError

    def _ensure_thread(self) -> None:
        """Start the health thread if this process has none (lock held)."""
        if self._closed:
            return
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        self._stop = threading.Event()
        # The thread holds the channel weakly: a cache dropped without close() must not
        # leave a thread and a connection pinging Redis for the rest of the process.
        self._thread = threading.Thread(
            target=_health,
            args=(weakref.ref(self), self._stop),
            name="ormcache-near-cache",
            daemon=True,
        )
        self._thread.start()


def _health(ref: weakref.ref[Background], stop: threading.Event) -> None:
    while not stop.is_set():
        channel = ref()
        if channel is None:
            return
        channel._step()
        pause = max(channel.interval / 2, channel._backoff)
        del channel
        stop.wait(pause)


class TrackingChannel(Background):
    """One process's push channel (see the module docstring).

    ``connect`` returns a connected redis-py connection speaking RESP3 (handshake, AUTH
    and database done); the channel takes over its socket. ``epoch`` changes on every
    connection set up, so a caller can tell whether what it read from Redis was read
    while this connection was the one tracking.

    ``probe`` replaces the health ``PING`` (``check_role``: ``ROLE``, which must say
    master). ``lock`` given: the channel is one member of a
    :class:`ClusterChannel`, which shares the
    lock, runs the health steps and handles forks; it has no thread of its own.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        prefixes: Sequence[str],
        listener: Listener,
        *,
        where: str,
        interval: float = HEALTH_INTERVAL,
        check_role: bool = False,
        probe: Probe | None = None,
        lock: threading.Lock | None = None,
        write_probe: str | None = None,
    ) -> None:
        self._connect = connect
        self._prefixes = tuple(prefixes)
        self._listener = listener
        self.where = where
        self.interval = interval
        if probe is None:
            probe = ((b"ROLE",), _still_master) if check_role else (_PING, lambda _r: None)
        self._probe = probe
        # A key never set, written (PEXPIRE, a no-op) at set-up and with every health
        # probe: while the server refuses writes, no invalidation reaches it, so memory
        # must not serve (a failed save: MISCONF; a read-only replica; NOREPLICAS).
        self._write_probe: Probe | None = None
        self.set_write_probe(write_probe)
        self._member = lock is not None
        self.lock = lock if lock is not None else threading.Lock()
        self.epoch = 0
        self._up = False
        self._sock: Any = None
        self._conn: Any = None
        self._poll: Any = None  # a Readiness while connected
        self._tls = False
        self._reader: Any = None
        self._push: Any = type(None)
        self._buf = bytearray(_BUFFER)
        self._pending: collections.deque[tuple[bytes, float, Callable[[Any], str | None]]] = (
            collections.deque()
        )
        #: Fences run after a drain that filled its buffer (observable in tests).
        self.fences = 0
        #: Replies received so far (a fence waits for its own by count).
        self._answered = 0
        #: Bytes read since the last reply past which the socket may have been full
        #: (see _full_at).
        self._full = _BUFFER
        self._unfenced = 0
        self._init_background(own_life=not self._member)

    def set_write_probe(self, key: str | None) -> None:
        """The key the write probe writes (None: no write probe)."""
        self._write_probe = None
        if key is not None:
            self._write_probe = ((b"PEXPIRE", key.encode(), b"1"), lambda _r: None)

    # -- the hot path ------------------------------------------------------------------
    def current(self) -> bool:
        """Apply every push the socket holds; True if memory may serve now."""
        with self.lock:
            if not self._up:
                self._ensure_thread()
                return False
            if self._poll.now() or (self._tls and self._sock.pending()):
                self._drain()
            return self._up

    @property
    def reason(self) -> str:
        """Why the channel went down or could not be set up, the last time it did."""
        return self._last_reason

    # -- reading -------------------------------------------------------------------------
    def _drain(self) -> None:
        """Read what the socket holds and apply it (lock held)."""
        total = self._read_all()
        if total < 0 or not self._apply():
            return
        self._unfenced += total
        if self._unfenced >= self._full or self._reader.has_data():
            # As much as the socket may hold at once since Redis last answered us (in
            # one drain or over several): Redis may hold further pushes it could not
            # write yet. Also when hiredis holds part of a message (a cut it can see:
            # not one that falls between elements), a cheap sign of the same.
            self.fences += 1
            self._fence()

    def _read_all(self) -> int:
        """Feed the reader everything the socket holds now: the bytes read, -1 if the
        channel fell (lock held).

        Read until the socket says it has nothing left, not until a read comes back
        short: the end of the connection waits behind the last bytes Redis wrote. A
        drain that stopped at a short read applied the pushes Redis sent before it
        killed the connection (``CLIENT KILL``), left the end unread and served from
        memory, while the commits made since, whose pushes never came, had returned
        (the multi-process race with the push connections killed every 0.3 s found it).
        A TLS socket also returns one TLS record per read (at most 16 KiB), with the
        records after it still waiting.
        """
        total = 0
        while True:
            n = self._recv()
            if n < 0:
                return -1
            if n == 0:
                return total
            total += n

    def _recv(self) -> int:
        """One read into the reader: the bytes read (0: none waiting), -1 if the channel
        fell (lock held)."""
        try:
            n: int = self._sock.recv_into(self._buf)
        except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
            return 0
        except OSError as exc:
            self._down(f"the connection failed ({exc})")
            return -1
        if n == 0:
            self._down("Redis closed the connection")
            return -1
        self._reader.feed(self._buf, 0, n)
        return n

    def _apply(self) -> bool:
        """Handle every complete message the reader holds; False if the channel fell."""
        reader = self._reader
        while True:
            try:
                msg: Any = reader.gets()
            except Exception as exc:  # hiredis.ProtocolError: not Redis speaking
                self._down(f"unreadable reply ({exc})")
                return False
            if msg is False:
                return True
            if type(msg) is self._push:
                # RESP3 pushes (hiredis tells them from replies); only invalidations
                # are subscribed to here.
                if len(msg) == 2 and msg[0] == b"invalidate":
                    names = msg[1]
                    self._listener.invalidated(names if type(names) is list else None)
                continue
            if not self._pending:
                self._down(f"a reply nobody asked for: {msg!r:.60}")
                return False
            asked, _, check = self._pending.popleft()
            self._answered += 1
            # Redis wrote everything it queued for us before this reply.
            self._unfenced = 0
            if isinstance(msg, Exception):
                self._down(f"{asked.decode()} failed: {msg}")
                return False
            reason = check(msg)
            if reason is not None:
                self._down(reason)
                return False

    def _send(self, probe: Probe) -> bool:
        """Send a short command (PING, ROLE, a probe) whose reply is expected in order
        and checked by the probe's check when it comes."""
        command, check = probe
        frame = _frame(command)
        name = b" ".join(command)
        try:
            sent = self._sock.send(frame)
        except OSError as exc:
            self._down(f"could not send {name.decode()} ({exc})")
            return False
        if sent != len(frame):
            self._down("the connection is not accepting writes")
            return False
        self._pending.append((name, time.monotonic(), check))
        return True

    def _fence(self, probe: Probe | None = None) -> None:
        """PING (or ``probe``) and read (bounded by half the interval) until its reply:
        every push Redis queued before it has then been applied."""
        if not self._send(probe or (_PING, lambda _r: None)):
            return
        # Done when this PING's own reply is in: replies come in the order asked, and
        # a health ping may still be waiting for its own ahead of it.
        wanted = self._answered + len(self._pending)
        deadline = time.monotonic() + self.interval / 2
        while self._up and self._answered < wanted:
            left = deadline - time.monotonic()
            if left <= 0 or not self._poll.wait(left):
                self._down("no reply to a fence PING in time")
                return
            n = self._read_all()
            if n > 0 and self._apply():
                # The read that held the reply counts whole: pushes may follow the reply
                # in it (an overcount errs toward fencing).
                self._unfenced += n

    # -- state -------------------------------------------------------------------------
    def _down(self, reason: str) -> None:
        """Forget everything and close the connection (lock held)."""
        was_up = self._up
        self._up = False
        self._pending.clear()
        if self._conn is not None:
            conn, self._conn, self._sock = self._conn, None, None
            with contextlib.suppress(Exception):  # closing a broken socket
                conn.disconnect()
        self._close_poll()
        self._listener.reset()
        if was_up and reason != self._last_reason:
            logger.warning(
                "ormcache: near cache off until its push channel to %s is back: %s",
                self.where,
                reason,
            )
        self._last_reason = reason

    def _setup(self) -> None:
        """Connect, turn tracking on and install the connection (lock not held: the
        connect may wait up to its timeout)."""
        conn = self._connect()
        try:
            self._install(conn)
        except BaseException:
            with contextlib.suppress(Exception):  # the connection failed already
                conn.disconnect()
            raise

    def _install(self, conn: Any) -> None:
        import hiredis

        conn.connect()
        sock = conn._sock
        reader = hiredis.Reader()
        args = [b"CLIENT", b"TRACKING", b"ON", b"BCAST"]
        for prefix in self._prefixes:
            args += [b"PREFIX", prefix.encode()]
        requests = [args]
        if self._write_probe is not None:
            # Before tracking is on, so that no push can come ahead of its reply.
            requests.insert(0, list(self._write_probe[0]))
        sock.sendall(b"".join(_frame(r) for r in requests))
        # Read the replies ourselves: pushes may follow them in the same segment, and
        # redis-py's parser would keep them in its own buffer.
        sock.settimeout(max(self.interval, 0.5))
        replies: list[Any] = []
        while len(replies) < len(requests):
            reply: Any = reader.gets()
            if reply is not False:
                replies.append(reply)
                continue
            n = sock.recv_into(self._buf)
            if n == 0:
                raise ConnectionError("closed during CLIENT TRACKING")
            reader.feed(self._buf, 0, n)  # type: ignore[arg-type] # any buffer works
        if isinstance(replies[0], Exception) and len(replies) == 2:
            raise ConnectionError(f"the server refuses writes ({replies[0]})")
        if replies[-1] != b"OK":
            raise ConnectionError(f"CLIENT TRACKING answered {replies[-1]!r}")
        sock.setblocking(False)
        poller = Readiness(sock)
        with self.lock:
            if self._closed or self._pid != os.getpid():
                poller.close()
                conn.disconnect()
                return
            self._close_poll()
            self._conn, self._sock, self._reader, self._poll = conn, sock, reader, poller
            self._push = hiredis.PushNotification
            self._tls = isinstance(sock, ssl.SSLSocket)
            self._full = _full_at(sock)
            self._pending.clear()
            self._unfenced = 0
            self.epoch += 1
            self._setup_done()
            # Nothing learned before this moment was covered by these pushes.
            self._listener.reset()
            self._up = True
            # The reader may already hold pushes that came with the reply.
            self._apply()
            if self._last_reason:
                logger.warning("ormcache: near cache on again (%s)", self.where)
            self._last_reason = ""

    def _close_poll(self) -> None:
        poller, self._poll = self._poll, None
        if poller is not None:
            poller.close()

    def _ensure_thread(self) -> None:
        if not self._member:
            super()._ensure_thread()

    def _step(self) -> None:
        if self._sock is None:
            try:
                self._setup()
            except Exception as exc:
                self._setup_failed(exc)
        else:
            with self.lock:
                self._check()

    def _check(self) -> None:
        """One health step (lock held): drain, fail a ping left unanswered, ping."""
        if not self._up:
            return
        self._drain()
        if not self._up:
            return
        if self._pending:
            if time.monotonic() - self._pending[0][1] > self.interval / 2:
                self._down(
                    f"no reply to a health ping within {self.interval / 2:.2f}s "
                    "(Redis hung or unreachable)"
                )
            return
        if self._send(self._probe) and self._write_probe is not None:
            self._send(self._write_probe)

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self._stop.set()
            # Closed on purpose (cache.close()): nothing to warn about.
            self._last_reason = "closed"
            self._down("closed")

    def _forked(self, lock: threading.Lock | None = None) -> None:
        """In a child: drop the parent's socket without reading it, start afresh (with
        ``lock``, the new lock of the cluster channel this one belongs to)."""
        self.lock = lock if lock is not None else threading.Lock()
        self._pid = os.getpid()
        self._up = False
        self._pending.clear()
        sock, self._sock, self._conn = self._sock, None, None
        if sock is not None:
            # Closes only the child's descriptor; the parent's connection is unaffected.
            with contextlib.suppress(OSError):
                sock.close()
        self._close_poll()
        self._thread = None
        self._stop = threading.Event()
        self._backoff = 0.0
        self._listener.reset()


class _Forkable(Protocol):
    def _forked(self) -> None: ...


# Every channel with a life of its own (members of a cluster channel are its business).
_channels: weakref.WeakSet[_Forkable] = weakref.WeakSet()


def track_forks(channel: _Forkable) -> None:
    """Have ``channel`` start afresh in a forked child (``_forked`` runs there)."""
    _channels.add(channel)


def _after_fork() -> None:
    for channel in list(_channels):
        channel._forked()


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_after_fork)
