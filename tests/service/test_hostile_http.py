"""The key service against hostile HTTP clients, over real sockets, under gunicorn with
several workers: slow and stalled clients hold no thread, gunicorn's own answers to
malformed requests are JSON, and no raw key or password reaches the server's log."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from examples.keyservice.launch import running_service

from tests.support.rawhttp import exchange, open_stalled, read_response

# Short deadlines keep the tests fast; production uses 10 s (see serving.py).
BODY_TIMEOUT = 2.0
HEADER_TIMEOUT = 2.0
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The production recipe with PostgreSQL and a password-protected Redis of the test's
    own, signed, its access and error logs (at debug level) captured in a file."""
    from tests.redis_procs import PrivateRedis
    from tests.support.services import POSTGRES_URL, require_service

    require_service("PostgreSQL", "127.0.0.1", 5432)
    tmp = tmp_path_factory.mktemp("hostile")
    password = f"pw-{uuid.uuid4().hex}"
    server = PrivateRedis(str(tmp / "redis"))
    server.start()
    import redis

    with redis.Redis(port=server.port) as admin:
        admin.config_set("requirepass", password)
    secret = f"sig-{uuid.uuid4().hex}"
    env = {
        "DATABASE_URL": POSTGRES_URL,
        "ORMCACHE_URL": f"redis://:{password}@127.0.0.1:{server.port}/0",
        "ORMCACHE_NAMESPACE": f"ks-{uuid.uuid4().hex[:10]}",
        "ORMCACHE_SECRET": secret,
        "KEYSERVICE_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "KEYSERVICE_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "KEYSERVICE_MAX_BODY": str(MAX_BODY),
    }
    log = tmp / "gunicorn.log"
    try:
        with running_service(env, workers=3, log_path=log, log_level="debug") as base:
            yield {
                "base": base,
                "port": int(base.rsplit(":", 1)[1]),
                "log": log,
                "secrets": [password, secret],
            }
    finally:
        server.kill()


def new_key(base: str) -> str:
    tag = uuid.uuid4().hex[:10]
    resp = requests.post(
        f"{base}/users", json={"name": f"n{tag}", "email": f"{tag}@example.com"}, timeout=10
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["api_key"])


def health_latencies(base: str, n: int, *, timeout: float) -> list[float | None]:
    """``n`` /health requests on fresh connections: each one's latency, None if it failed."""
    out: list[float | None] = []
    for _ in range(n):
        start = time.monotonic()
        try:
            resp = requests.get(f"{base}/health", timeout=timeout, headers={"Connection": "close"})
            out.append(time.monotonic() - start if resp.status_code == 200 else None)
        except requests.RequestException:
            out.append(None)
    return out


def post_head(length: int, *, path: str = "/users") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_stalled_and_short_bodies_never_block_the_service(hostile: dict[str, object]) -> None:
    """Issue 12: 100 connections that announce a 1 MB body and stall, and bodies shorter
    than their Content-Length, held every gunicorn thread, so ``/health`` timed out. Now
    the body is read on an event loop and the app runs only once it is whole: /health and
    real requests answer at once while 100 oversized, 100 stalled and 20 short bodies are
    pending. The oversized ones get 413 at once; the stalled and short ones 408 after the
    body timeout, and their connections close."""
    base, port = str(hostile["base"]), int(hostile["port"])  # type: ignore[call-overload]
    oversized = [open_stalled(port, post_head(1_000_000) + b'{"name": "') for _ in range(100)]
    stalled = [open_stalled(port, post_head(60_000) + b'{"name": "') for _ in range(100)]
    short = [open_stalled(port, post_head(100) + b'{"name": 1}') for _ in range(20)]
    started = time.monotonic()
    try:
        latencies = health_latencies(base, 20, timeout=3.0)
        key = new_key(base)
        me = requests.get(f"{base}/me", headers={"Authorization": f"Bearer {key}"}, timeout=3)
        assert me.status_code == 200
        elapsed_before_deadline = time.monotonic() - started
        assert None not in latencies, latencies
        print(f"/health with 220 pending bodies: max {max(latencies) * 1000:.0f} ms")  # type: ignore[type-var]
        assert max(latencies) < 1.0  # type: ignore[type-var]
        assert elapsed_before_deadline < BODY_TIMEOUT  # all of it before any 408

        for sock in oversized:
            answer = read_response(sock, timeout=3.0)
            assert answer.status == 413 or (answer.status is None and answer.reset), answer
        for sock in stalled + short:
            answer = read_response(sock, timeout=BODY_TIMEOUT + 5.0)
            assert answer.status == 408, answer
            assert answer.is_json
            assert answer.json()["error"] == "request_timeout"
            assert sock.recv(1) == b""  # and the connection is closed
    finally:
        for sock in oversized + stalled + short:
            sock.close()


def test_requests_that_never_complete_are_answered_and_dropped(
    hostile: dict[str, object],
) -> None:
    """A body that never completes gets a JSON 408 after the body timeout, headers that
    never complete (and a connection that sends nothing) get one after the header
    timeout, and each connection is then closed: none is held forever. A body cut short
    by the client closing its side gets a 400, not a 5xx."""
    port = int(hostile["port"])  # type: ignore[call-overload]
    body = exchange(port, post_head(500) + b'{"name"', timeout=BODY_TIMEOUT + 5)
    assert body.status == 408, body
    assert body.is_json
    assert BODY_TIMEOUT - 0.5 < body.elapsed < BODY_TIMEOUT + 3
    headers = exchange(port, b"GET /health HTTP/1.1\r\nHost: t\r\n", timeout=HEADER_TIMEOUT + 5)
    assert headers.status == 408, headers
    assert headers.is_json
    silent = exchange(port, b"", timeout=HEADER_TIMEOUT + 5)
    assert silent.status == 408, silent
    cut = exchange(port, post_head(500) + b'{"name"', half_close=True, timeout=5)
    assert cut.status == 400 or cut.status is None, cut
    assert not cut.hung


def test_oversized_bodies_are_refused_with_413(hostile: dict[str, object]) -> None:
    """A declared Content-Length over the limit is refused before any of it is read; a
    chunked body that grows past the limit is refused when it does."""
    port = int(hostile["port"])  # type: ignore[call-overload]
    declared = exchange(port, post_head(MAX_BODY + 1))
    assert declared.status == 413, declared
    assert declared.is_json
    head = (
        b"POST /users HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b"x" * 16 * 1024)
    chunked = exchange(port, head, rest=chunk * 6 + b"0\r\n\r\n")
    assert chunked.status == 413 or (chunked.status is None and chunked.reset), chunked


KEY_PLACEHOLDER = b"<KEY>"
MALFORMED = {
    "bad request line": (b"GARBAGE\r\n\r\n", 400),
    "bad HTTP version": (b"GET /health HTTP/9.9\r\nHost: t\r\n\r\n", 400),
    "missing colon": (
        b"GET /me HTTP/1.1\r\nHost: t\r\nAuthorization Bearer <KEY>\r\n\r\n",
        400,
    ),
    "space before colon": (
        b"GET /me HTTP/1.1\r\nHost: t\r\nAuthorization : Bearer <KEY>\r\n\r\n",
        400,
    ),
    "NUL in a header": (b"GET /me HTTP/1.1\r\nHost: t\r\nX-A: a\x00<KEY>\r\n\r\n", 400),
    "non-UTF-8 in the request line": (b"GET /\xff\xfe<KEY> HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "obsolete line folding": (
        b"GET /me HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer\r\n <KEY>\r\n\r\n",
        400,
    ),
    "Content-Length and chunked": (
        b"POST /users HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bad Content-Length": (b"POST /users HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n", 400),
    "URI too long": (b"GET /" + b"a" * 9000 + b"?k=<KEY> HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    "header too large": (
        b"GET /me HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer <KEY>" + b"a" * 9000 + b"\r\n\r\n",
        431,
    ),
    "too many headers": (
        b"GET /me HTTP/1.1\r\nHost: t\r\n"
        + b"".join(b"X-%d: <KEY>\r\n" % i for i in range(120))
        + b"\r\n",
        431,
    ),
}


@pytest.mark.parametrize(("request_bytes", "status"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_json_4xx_without_the_request_in_it(
    hostile: dict[str, object], request_bytes: bytes, status: int
) -> None:
    """Issue 12: gunicorn's own answers to requests it cannot parse (400, 414, 431) were
    HTML that quoted the offending line. They are JSON now, ``{"error", "message"}`` like
    the app's, with the right status, and quote nothing of the request."""
    key = new_key(str(hostile["base"])).encode()
    answer = exchange(int(hostile["port"]), request_bytes.replace(KEY_PLACEHOLDER, key))  # type: ignore[call-overload]
    assert answer.status == status, answer
    assert answer.is_json, answer
    assert set(answer.json()) == {"error", "message"}
    assert key not in answer.raw
    assert answer.headers.get("connection") == "close"


def test_malformed_header_lines_never_reach_the_log(hostile: dict[str, object]) -> None:
    """Issue 12: a header line without a colon, ``Authorization Bearer <key>``, was logged
    whole by gunicorn, key included. Every malformed request above, each with a live key
    in it, and keys in a URL path and query string: the server's log (debug level)
    names none of the keys, nor the Redis password or the signing secret."""
    base, port = str(hostile["base"]), int(hostile["port"])  # type: ignore[call-overload]
    keys = []
    for request_bytes, _ in MALFORMED.values():
        key = new_key(base)
        keys.append(key)
        exchange(port, request_bytes.replace(KEY_PLACEHOLDER, key.encode()))
    key = new_key(base)
    keys.append(key)
    requests.get(f"{base}/me/{key}?api_key={key}", timeout=5)
    requests.get(f"{base}/me", headers={"Authorization": f"Token {key}"}, timeout=5)
    time.sleep(0.5)  # the workers' log lines reach the file
    log = Path(hostile["log"]).read_text(errors="replace")  # type: ignore[arg-type]
    leaked = [s for s in keys + hostile["secrets"] if s in log]  # type: ignore[operator]
    assert leaked == []
    assert "rejected a malformed or incomplete request" in log  # it does speak of them
