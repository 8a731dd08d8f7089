"""Ports for servers a test starts itself (or for a URL where nothing listens)."""

from __future__ import annotations

import random
import socket

__all__ = ["free_port"]


def free_port(*, bus: bool = False) -> int:
    """A port nothing listens on right now.

    With ``bus``, one whose cluster bus port (port + 10000) is free too, which the
    kernel's ephemeral range (up to 60999) cannot promise.
    """
    if not bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(100):
        port = random.randint(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")
