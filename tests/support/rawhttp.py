"""HTTP/1.1 over a bare socket, for requests no HTTP client library would send: malformed
lines, bodies shorter than announced, bodies that stall. Every wait is bounded."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RawResponse", "exchange", "open_stalled", "parse_response", "read_response"]


@dataclass
class RawResponse:
    """What came back: ``status`` is None when no status line arrived, ``hung`` when the
    client timeout ran out first, ``reset`` when the server reset the connection."""

    raw: bytes = b""
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hung: bool = False
    reset: bool = False
    elapsed: float = 0.0

    @property
    def is_json(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/json")

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    response = RawResponse(raw=raw, body=body)
    parts = lines[0].split(" ", 2)
    if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isdigit():
        response.status = int(parts[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        response.headers[name.strip().lower()] = value.strip()
    return response


def read_response(sock: socket.socket, *, timeout: float) -> RawResponse:
    """Read one response: until Content-Length is satisfied, the server closes, or
    ``timeout`` seconds pass."""
    start = time.monotonic()
    deadline = start + timeout
    raw = b""
    hung = reset = False
    while True:
        head_end = raw.find(b"\r\n\r\n")
        if head_end >= 0:
            head = parse_response(raw[: head_end + 4])
            if head.status is not None and 100 <= head.status < 200:
                raw = raw[head_end + 4 :]  # an interim answer (100 Continue): the next
                continue
            if head.status in (204, 304):
                break
            length = head.headers.get("content-length")
            if length is not None and length.isdigit() and len(raw) >= head_end + 4 + int(length):
                break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            hung = True
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            hung = True
            break
        except (ConnectionResetError, BrokenPipeError):
            reset = True
            break
        if not chunk:
            break
        raw += chunk
    response = parse_response(raw)
    response.hung = hung and response.status is None
    response.reset = reset
    response.elapsed = time.monotonic() - start
    return response


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False  # the server answered early and closed: read what it said
    return True


def exchange(
    port: int,
    data: bytes,
    *,
    timeout: float = 5.0,
    rest: bytes = b"",
    half_close: bool = False,
) -> RawResponse:
    """Send ``data`` (then ``rest``, unless the server has closed by then), optionally
    close the sending side, and read the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if _send(sock, data) and rest:
            _send(sock, rest)
        if half_close:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        return read_response(sock, timeout=timeout)


def open_stalled(port: int, data: bytes) -> socket.socket:
    """A connection that sent ``data`` and then sends nothing more (the caller closes it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    sock.sendall(data)
    return sock
