"""The push channel of a Redis Cluster: one tracking connection per primary (see
:mod:`.tracking` for one connection's rules), off whenever any of them is, or when the
cluster's topology differs from the one it was set up for."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .tracking import (
    HEALTH_INTERVAL,
    Background,
    Listener,
    Readiness,
    TrackingChannel,
    logger,
)

__all__ = ["ClusterChannel", "cluster_shape", "primaries_of"]

#: One node's view of the cluster: (node id, address, flags, master id, slots) per node,
#: sorted; what changes only when the topology does (no timestamps, no link states).
Shape = tuple[tuple[str, str, str, str, str], ...]
_VOLATILE_FLAGS = frozenset({"myself", "noflags"})
_UNHEALTHY_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})


def cluster_shape(reply: Any) -> Shape:
    """Parse a ``CLUSTER NODES`` reply into its :data:`Shape`."""
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        flags = ",".join(sorted(set(fields[2].split(",")) - _VOLATILE_FLAGS))
        address = fields[1].split("@", 1)[0]
        rows.append((fields[0], address, flags, fields[3], " ".join(fields[8:])))
    return tuple(sorted(rows))


def primaries_of(shape: Shape) -> frozenset[str]:
    """The primaries' addresses (``host:port``); ValueError if the cluster is not whole
    (a primary failing or unreachable from the node asked: its pushes could be lost)."""
    primaries = set()
    for _id, address, flags, _master, _slots in shape:
        names = set(flags.split(","))
        if "master" not in names:
            continue
        if names & _UNHEALTHY_FLAGS or address.startswith(":"):
            raise ValueError(f"primary {address} is flagged {flags}")
        primaries.add(address)
    if not primaries:
        raise ValueError("no primary listed")
    return frozenset(primaries)


def write_probes(shape: Shape, prefix: str) -> dict[str, str]:
    """For each primary (``host:port``), a key never set that lives in one of its slots:
    the write its channel's health probe makes (see ``TrackingChannel``), so that a node
    refusing writes turns the near cache off. A few tries each: a primary of n holds
    about 1/n of the slots."""
    from redis.crc import key_slot

    probes = {}
    for _id, address, flags, _master, slots in shape:
        if "master" not in flags.split(","):
            continue
        ranges = []
        for token in slots.split():
            if token.startswith("["):
                continue  # a slot being migrated
            low, _, high = token.partition("-")
            ranges.append((int(low), int(high or low)))
        if not ranges:
            continue
        for i in range(1_000_000):
            tag = f"{prefix}w{i}"
            slot = key_slot(tag.encode())
            if any(low <= slot <= high for low, high in ranges):
                probes[address] = "{" + tag + "}:w"
                break
    return probes


class ClusterChannel(Background):
    """The push channel of a Redis Cluster: one :class:`TrackingChannel` per primary,
    since a namespace's generations and entries spread over every node's slots.

    It offers what the near cache uses of a channel (``current``, ``lock``, ``up``,
    ``epoch``, ``reason``, ``interval``, ``close``), with one lock and one listener for
    all members, and is up only while every member is up and the topology is the one it
    was set up for:

    * :meth:`current` drains every member's socket (one ``poll`` over all of them);
    * a member that goes down takes the whole channel down (the listener resets), and
      ``epoch`` changes each time the whole comes up again, so a refill read while any
      member reconnected is never remembered;
    * each member's health probe is ``CLUSTER NODES`` on its own connection: a node that
      reports other primaries than the ones tracked (a failover promoted a replica, a
      node was added or removed), or a view that changed since set-up (a resharding, a
      slot migrating, a node failing), takes the channel down; the health thread then
      asks the cluster again and tracks the primaries it has now;
    * a cluster with a primary flagged failing is not tracked at all.

    ``discover`` returns the addresses (``host:port``) of nodes to ask for the topology;
    ``connect(host, port)`` a redis-py connection speaking RESP3 to one node.
    """

    def __init__(
        self,
        discover: Callable[[], Sequence[str]],
        connect: Callable[[str, int], Any],
        prefixes: Sequence[str],
        listener: Listener,
        *,
        where: str,
        interval: float = HEALTH_INTERVAL,
    ) -> None:
        self._discover = discover
        self._connect = connect
        self._prefixes = tuple(prefixes)
        self._listener = listener
        self.where = where
        self.interval = interval
        self.lock = threading.Lock()
        self.epoch = 0
        self._up = False
        self._members: dict[str, TrackingChannel] = {}
        self._write_probes: dict[str, str] = {}
        self._primaries: frozenset[str] = frozenset()
        self._shapes: dict[str, Shape] = {}
        self._by_fd: dict[int, TrackingChannel] = {}
        self._poll: Any = None
        self._tls = False
        self._init_background()

    # -- the hot path ------------------------------------------------------------------
    def current(self) -> bool:
        """Apply every push any member's socket holds; True if memory may serve now."""
        with self.lock:
            if not self._up:
                self._ensure_thread()
                return False
            ready = self._poll.now()
            if ready:
                by_fd = self._by_fd
                for fd, _event in ready:
                    by_fd[fd]._drain()
                    if not self._up:
                        return False
            if self._tls:
                for member in self._members.values():
                    if member._sock.pending():
                        member._drain()
            return self._up

    @property
    def reason(self) -> str:
        """Why the channel went down or could not be set up, the last time it did."""
        if self._last_reason:
            return self._last_reason
        return next((m.reason for m in self._members.values() if m.reason), "")

    # -- members -----------------------------------------------------------------------
    def invalidated(self, names: Sequence[bytes] | None) -> None:
        """A member's push (lock held)."""
        self._listener.invalidated(names)

    def reset(self) -> None:
        """A member went down or came up (lock held): the whole channel is down until
        the health thread has checked every member and the topology again."""
        self._up = False
        self._listener.reset()

    def _member(self, address: str) -> TrackingChannel:
        host, _, port = address.rpartition(":")

        def check(reply: Any) -> str | None:
            return self._same_topology(address, reply)

        return TrackingChannel(
            lambda: self._connect(host, int(port)),
            self._prefixes,
            self,
            where=f"{self.where} node {address}",
            interval=self.interval,
            probe=((b"CLUSTER", b"NODES"), check),
            lock=self.lock,
            write_probe=self._write_probes.get(address),
        )

    def _same_topology(self, address: str, reply: Any) -> str | None:
        """A member's probe reply (lock held): None if the node still sees the cluster
        as it did when the channel came up."""
        shape = cluster_shape(reply)
        try:
            primaries = primaries_of(shape)
        except ValueError as exc:
            return f"the cluster is not whole as seen from {address}: {exc}"
        if primaries != self._primaries:
            return (
                f"the cluster's primaries changed as seen from {address} (a failover, or "
                "nodes added or removed)"
            )
        known = self._shapes.setdefault(address, shape)
        if known != shape:
            return f"the cluster's topology changed as seen from {address} (slots moved?)"
        return None

    def _topology(self) -> frozenset[str]:
        """The primaries, asked of the first node that answers (lock not held); their
        write probes are kept in ``_write_probes``."""
        failures = []
        for address in dict.fromkeys([*self._members, *self._discover()]):
            host, _, port = address.rpartition(":")
            try:
                conn = self._connect(host, int(port))
                try:
                    conn.connect()
                    conn.send_command("CLUSTER", "NODES")
                    reply = conn.read_response()
                finally:
                    conn.disconnect()
                shape = cluster_shape(reply)
                primaries = primaries_of(shape)
                self._write_probes = write_probes(shape, self._prefixes[0].lstrip("{"))
                return primaries
            except Exception as exc:
                failures.append(f"{address}: {exc}")
        raise ConnectionError("; ".join(failures) or "no node to ask")

    # -- health ------------------------------------------------------------------------
    def _step(self) -> None:
        if self._up:
            with self.lock:
                for member in list(self._members.values()):
                    member._check()
                    if not self._up:
                        break
            return
        with self.lock:
            # Members still up keep being read while another is set up (or cannot be):
            # a server holds what a tracking client has not read, without bound.
            for member in self._members.values():
                if member.up:
                    member._drain()
        try:
            self._build()
        except Exception as exc:
            self._setup_failed(exc)

    def _build(self) -> None:
        """Track every primary the cluster has now, check that each one sees the same
        primaries, then serve again (lock not held but to install)."""
        primaries = self._topology()
        with self.lock:
            if self._closed or self._pid != os.getpid():
                return
            for address in set(self._members) - primaries:
                self._members.pop(address)._down("no longer a primary of the cluster")
            for address in primaries - set(self._members):
                self._members[address] = self._member(address)
            for address, member in self._members.items():
                # Slots may have moved: each probe must stay in its node's slots.
                member.set_write_probe(self._write_probes.get(address))
            self._primaries = primaries
            self._shapes.clear()
            members = list(self._members.values())
        for member in members:
            if member._sock is None:
                member._setup()
        with self.lock:
            if self._closed or self._primaries != primaries:
                return
            for member in members:
                # A member's first probe records its view; every later one must match.
                if member._sock is None:
                    return
                member._fence(member._probe)
                if not member.up:
                    return
            self._drop_poll()
            self._poll = Readiness(*(member._sock for member in members))
            self._by_fd = {member._sock.fileno(): member for member in members}
            self._tls = any(m._tls for m in members)
            self.epoch += 1
            self._listener.reset()
            self._up = True
            self._setup_done()
            if self._last_reason:
                logger.warning("ormcache: near cache on again (%s)", self.where)
            self._last_reason = ""

    def _drop_poll(self) -> None:
        poller, self._poll, self._by_fd = self._poll, None, {}
        if poller is not None:
            poller.close()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self._stop.set()
            self._up = False
            for member in self._members.values():
                member._closed = True
                member._last_reason = "closed"  # one channel closing: no line per node
                member._down("closed")
            self._drop_poll()
            self._listener.reset()

    def _forked(self) -> None:
        """In a child: every member drops the parent's socket; set up afresh."""
        self.lock = threading.Lock()
        self._pid = os.getpid()
        self._up = False
        self._drop_poll()
        self._thread = None
        self._stop = threading.Event()
        self._backoff = 0.0
        for member in self._members.values():
            member._forked(self.lock)
        self._listener.reset()
