"""The push channel's bookkeeping, against a scripted server on a socketpair: the
interleavings of replies and pushes that a real Redis produces only under load, made
exactly (``tests/test_near_cache.py`` runs the channel against real servers)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from ormcache.backends.redis.tracking import TrackingChannel


class Recorder:
    """The channel's listener: every key pushed, in order."""

    def __init__(self) -> None:
        self.names: list[bytes] = []

    def invalidated(self, names: Sequence[bytes] | None) -> None:
        self.names.extend(names or [b"*"])

    def reset(self) -> None:
        pass


class Conn:
    """What ``connect`` hands the channel: a connected socket (redis-py's shape)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        self._sock.close()


def push(name: bytes) -> bytes:
    """A RESP3 invalidation push for one key."""
    return b">2\r\n$10\r\ninvalidate\r\n*1\r\n$%d\r\n%s\r\n" % (len(name), name)


def read_command(sock: socket.socket) -> bytes:
    """One whole RESP command from the channel (they are short)."""
    sock.settimeout(5)
    data = sock.recv(4096)
    assert data.startswith(b"*"), data
    return data


def set_up(ours: socket.socket, server: socket.socket) -> tuple[TrackingChannel, Recorder]:
    """A channel set up over ``ours``, the server's end answering ``CLIENT TRACKING``."""
    listener = Recorder()
    channel = TrackingChannel(lambda: Conn(ours), ["ns:"], listener, where="scripted")

    def accept() -> None:
        assert b"TRACKING" in read_command(server)
        server.sendall(b"+OK\r\n")

    helper = threading.Thread(target=accept)
    helper.start()
    channel._setup()
    helper.join()
    assert channel.current()
    return channel, listener


@pytest.fixture
def scripted() -> Iterator[tuple[TrackingChannel, Recorder, socket.socket]]:
    """A channel set up over a socketpair, and the server's end of it."""
    ours, server = socket.socketpair()
    channel, listener = set_up(ours, server)
    yield channel, listener, server
    channel.close()
    server.close()


def test_a_fence_waits_for_its_own_reply_not_a_health_pings(
    scripted: tuple[TrackingChannel, Recorder, socket.socket],
) -> None:
    """A drain that fills its buffer fences: every push queued before the fence's PING
    must be applied before memory serves. With a health ping still unanswered (its reply
    is behind the same backlog), the fence used to stop at the health ping's reply, and
    the hit served with the push that mattered still unread (found by review)."""
    channel, listener, server = scripted
    with channel.lock:
        channel._check()  # sends the health ping, which stays unanswered for now
    assert b"PING" in read_command(server)
    # More pushes than one drain reads: the drain fences.
    server.sendall(b"".join(push(b"ns:noise-%06d" % i) for i in range(3000)))

    def answer() -> None:
        assert b"PING" in read_command(server)  # the fence
        server.sendall(b"+PONG\r\n")  # the health ping's reply
        time.sleep(0.05)
        # Queued by Redis before the fence's PING, so written before its reply.
        server.sendall(push(b"ns:target") + b"+PONG\r\n")

    helper = threading.Thread(target=answer)
    helper.start()
    assert channel.current(), channel.reason
    served_with = list(listener.names)
    helper.join()
    assert channel.fences == 1
    assert b"ns:target" in served_with, "memory would serve before the push was applied"


def test_a_reply_nobody_asked_for_takes_the_channel_down(
    scripted: tuple[TrackingChannel, Recorder, socket.socket],
) -> None:
    """The channel matches replies to what it asked, in order; one it cannot match
    means it no longer knows where it is in the stream: nothing is served from memory."""
    channel, _, server = scripted
    server.sendall(b"+PONG\r\n")
    time.sleep(0.05)
    assert not channel.current()
    assert "nobody asked for" in channel.reason


def answer_fence(server: socket.socket, before_reply: bytes = b"") -> threading.Thread:
    """The server's side of one fence: read its PING, send ``before_reply`` (what Redis
    had queued ahead of it), then the reply."""

    def answer() -> None:
        assert b"PING" in read_command(server)
        time.sleep(0.05)
        server.sendall(before_reply + b"+PONG\r\n")

    helper = threading.Thread(target=answer)
    helper.start()
    return helper


def test_a_push_cut_short_is_fenced_and_applied_whole_before_memory_serves(
    scripted: tuple[TrackingChannel, Recorder, socket.socket],
) -> None:
    """A drain that ends inside a message: Redis has not finished writing to us (it
    writes a client at most 64 KiB per event-loop turn), so what follows may be a push
    for a commit that already returned. The hit fences before serving, and the push is
    applied whole, never half."""
    channel, listener, server = scripted
    message = push(b"ns:split")
    server.sendall(message[:9])
    time.sleep(0.02)
    helper = answer_fence(server, before_reply=message[9:])
    assert channel.current(), channel.reason
    helper.join()
    assert channel.fences == 1
    assert listener.names == [b"ns:split"], "memory served with a push half read"


def test_drains_that_add_up_to_a_full_socket_fence(
    scripted: tuple[TrackingChannel, Recorder, socket.socket],
) -> None:
    """The socket may have been full across two drains as well as in one: what counts
    is what was read since Redis last answered, not what one drain read."""
    channel, listener, server = scripted
    each = len(push(b"ns:b0-000000"))
    count = int(0.4 * channel._full) // each + 1  # two batches fall short, three do not
    batches = [b"".join(push(b"ns:b%d-%06d" % (b, i)) for i in range(count)) for b in range(3)]
    for batch in batches[:2]:
        server.sendall(batch)
        time.sleep(0.02)
        assert channel.current(), channel.reason
    assert channel.fences == 0
    helper = answer_fence(server)
    server.sendall(batches[2])
    time.sleep(0.02)
    assert channel.current(), channel.reason
    helper.join()
    assert channel.fences == 1
    # A reply came: the count starts over.
    server.sendall(batches[0])
    time.sleep(0.02)
    assert channel.current(), channel.reason
    assert channel.fences == 1
    assert len(listener.names) == 4 * count


def test_a_small_receive_buffer_fences_sooner() -> None:
    """Whether a drain may have missed pushes Redis could not write depends on the
    kernel's receive buffer, not on the drain's own 64 KiB: with a small one (set low,
    or memory pressure) a drain of far less than 64 KiB may have filled it, and fences."""
    ours, server = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    channel, listener = set_up(ours, server)
    try:
        size = ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        pushes = b"".join(push(b"ns:k-%06d" % i) for i in range(size // 40))
        assert size // 2 <= len(pushes) < 65536

        def answer() -> None:
            assert b"PING" in read_command(server)
            server.sendall(b"+PONG\r\n")

        helper = threading.Thread(target=answer)
        helper.start()
        server.sendall(pushes)
        deadline = time.monotonic() + 5
        while len(listener.names) < size // 40 and time.monotonic() < deadline:
            assert channel.current(), channel.reason
        helper.join()
        assert channel.fences >= 1
    finally:
        channel.close()
        server.close()


def test_the_end_of_the_connection_behind_the_last_pushes_is_never_left_unread(
    scripted: tuple[TrackingChannel, Recorder, socket.socket],
) -> None:
    """Redis killed the connection (``CLIENT KILL``) right after writing some pushes:
    the socket holds them, then the end. A drain that stopped at its first short read
    applied the pushes, left the end unread and served from memory, though the commits
    made after the kill, whose pushes never came, had returned (2 stale reads in the
    multi-process race with the push connections killed every 0.3 s)."""
    channel, _listener, server = scripted
    server.sendall(push(b"ns:before-the-kill"))
    server.close()
    time.sleep(0.05)
    assert not channel.current(), "memory served with the connection already gone"
    assert "closed" in channel.reason
