"""How the key service is served: gunicorn's asyncio worker, with the WSGI app behind a buffer.

A threaded WSGI server hands the socket to a thread before the request body has arrived,
so a client that announces a large body and then stalls holds that thread until it goes
away: a hundred of them and ``/health`` times out. Here gunicorn's ``asgi`` worker reads
every connection on its event loop, where a slow client costs a few kilobytes and no
thread, and :class:`BufferedWSGI` hands the Flask app to a thread only once the whole
body is in memory. Bodies are bounded in size (413) and time (408); request headers are
bounded in time too (408), so a connection that never completes its request is dropped.

:class:`Worker` is the gunicorn worker class (``-k examples.keyservice.serving.Worker``).
It also makes gunicorn's own answers to malformed requests (bad request line, overlong
URI, oversized or malformed headers) JSON like the app's, and never puts the request's
bytes in them or in the log: a header line such as ``Authorization Bearer <key>`` carries
a key. :class:`RedactingLogger` (``--logger-class``) redacts API keys, bearer tokens and
passwords from whatever else gunicorn logs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http
import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.glogging import Logger
from gunicorn.workers import gasgi

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WSGIApp = Callable[..., Iterable[bytes]]

# The service's largest valid body (a name and an e-mail address) is under 1 KiB.
MAX_BODY = int(os.environ.get("KEYSERVICE_MAX_BODY", str(64 * 1024)))
BODY_TIMEOUT = float(os.environ.get("KEYSERVICE_BODY_TIMEOUT", "10"))
HEADER_TIMEOUT = float(os.environ.get("KEYSERVICE_HEADER_TIMEOUT", "10"))

log = logging.getLogger("keyservice.serving")


def error_body(status: int, message: str) -> bytes:
    """The JSON error body the app also answers with: ``{"error": ..., "message": ...}``."""
    phrase = http.HTTPStatus(status).phrase
    slug = phrase.lower().replace(" ", "_").replace("-", "_")
    return json.dumps({"error": slug, "message": message}).encode()


class _BodyTooLarge(Exception):
    pass


class BufferedWSGI:
    """An ASGI app that runs a WSGI app on a thread pool once the request body is complete.

    The body is read on the event loop, at most ``max_body`` bytes (a larger declared
    ``Content-Length`` is refused before reading anything) within ``body_timeout`` seconds
    from the end of the headers. Only then does a thread run the WSGI app, on a
    ``BytesIO``: no thread ever waits for a client. The response is collected in the thread
    (the service's answers are small JSON documents) and written by the event loop.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        threads: int = 4,
        max_body: int = MAX_BODY,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        self.app = app
        self.threads = max(1, threads)
        self.max_body = max_body
        self.body_timeout = body_timeout
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._lock = threading.Lock()

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # Made in the worker process, on first use: threads do not survive a fork.
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.threads, thread_name_prefix="wsgi"
                )
                self._pool_pid = os.getpid()
            return self._pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: the service has none
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _answer(send, 413, f"the body must be at most {self.max_body} bytes")
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except _BodyTooLarge:
            await _answer(send, 413, f"the body must be at most {self.max_body} bytes")
            return
        except asyncio.TimeoutError:
            await _answer(
                send, 408, f"the request body did not arrive within {self.body_timeout:g}s"
            )
            return
        if body is None:
            # The client closed its side before the body was complete. Nobody may read
            # the answer, but without one gunicorn would log a 500 of its own.
            await _answer(send, 400, "the connection closed before the body was complete")
            return
        environ = wsgi_environ(scope, body)
        loop = asyncio.get_running_loop()
        try:
            status, headers, content = await loop.run_in_executor(
                self._executor(), _run_wsgi, self.app, environ
            )
        except Exception:
            log.exception("the WSGI application failed")
            await _answer(send, 500, "internal error; see the server log")
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._pool is not None and self._pool_pid == os.getpid():
                    self._pool.shutdown(wait=False)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1").strip()
    return None


async def _answer(send: Send, status: int, message: str) -> None:
    """A JSON error, and the connection closes: the unread body must not be parsed as
    the next request."""
    body = error_body(status, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def wsgi_environ(scope: Scope, body: bytes) -> dict[str, Any]:
    """PEP 3333's environ for an ASGI HTTP scope whose body has been read whole."""
    raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
    path = unquote_to_bytes(bytes(raw_path).split(b"?", 1)[0]).decode("latin-1")
    root = scope.get("root_path", "") or ""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root.encode("utf-8").decode("latin-1"),
        "PATH_INFO": path[len(root) :] if root and path.startswith(root) else path,
        "QUERY_STRING": bytes(scope.get("query_string", b"")).decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] or 80),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        name = bytes(raw_name).decode("latin-1").upper()
        # An underscore would let a client forge a header a proxy set (X_Forwarded_For
        # and X-Forwarded-For meet in one environ key): such headers are dropped.
        if "_" in name:
            continue
        value = bytes(raw_value).decode("latin-1")
        if name == "CONTENT-LENGTH":
            continue  # the body's real length, above
        key = "CONTENT_TYPE" if name == "CONTENT-TYPE" else "HTTP_" + name.replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def _run_wsgi(
    app: WSGIApp, environ: dict[str, Any]
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run the WSGI app to completion in this (pool) thread; collect its response."""
    started: list[Any] = []
    chunks: list[bytes] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]
        return chunks.append

    result = app(environ, start_response)
    try:
        for chunk in result:
            chunks.append(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not started:
        raise RuntimeError("the WSGI application returned without calling start_response")
    status, headers = started
    encoded = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    return int(status.split(" ", 1)[0]), encoded, b"".join(chunks)


class JsonErrorProtocol(ASGIProtocol):  # type: ignore[misc]
    """gunicorn's HTTP/1 protocol, with JSON error answers and a deadline on headers.

    gunicorn writes its own answers to requests it cannot parse (400, 414, 431, 501) as
    text that quotes the offending bytes. Here they carry the app's JSON error shape and
    only the status's phrase: the quoted bytes can be a header line with a key in it.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._headers_timer: asyncio.TimerHandle | None = self.worker.loop.call_later(
            HEADER_TIMEOUT, self._headers_too_slow
        )

    def _on_headers_complete(self) -> Any:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        return super()._on_headers_complete()

    def _headers_too_slow(self) -> None:
        # Only a first request can be waiting here: later ones on a kept-alive connection
        # are bounded by gunicorn's keep-alive timer.
        self._headers_timer = None
        if self._closed or self._current_request is not None:
            return
        self._send_error_response(408, "the request headers did not arrive in time")
        self._close_transport()
        self._request_ready.set()  # the connection loop sees _closed and ends

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        super().connection_lost(exc)

    def _send_error_response(
        self, status: int, message: str, extra_headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        # The status only: gunicorn's message quotes the request, which may hold a key.
        if status >= 500:
            log.error("answered %d to a request from %s", status, peer and peer[0])
        else:
            log.warning(
                "rejected a malformed or incomplete request from %s: %d %s",
                peer and peer[0],
                status,
                http.HTTPStatus(status).phrase,
            )
        phrase = http.HTTPStatus(status).phrase
        text = message if status == 408 else phrase
        body = error_body(status, text)
        head = "".join(
            [
                f"HTTP/1.1 {status} {phrase}\r\n",
                "Content-Type: application/json\r\n",
                f"Content-Length: {len(body)}\r\n",
                *(f"{name}: {value}\r\n" for name, value in extra_headers),
                "Connection: close\r\n\r\n",
            ]
        )
        self._safe_write(head.encode("latin-1") + body)


class Worker(gasgi.ASGIWorker):  # type: ignore[misc]
    """gunicorn's asyncio worker serving a WSGI app through :class:`BufferedWSGI`.

    ``--threads`` sizes the pool the app runs on; ``--worker-connections`` is not a
    limit here, the header and body deadlines are.
    """

    asgi: Any

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """``--threads`` is used (for the app's pool), unlike in the plain asgi worker."""

    def init_process(self) -> None:
        # gunicorn's worker builds its protocol by this module-level name when it starts
        # serving, in this worker process only.
        gasgi.ASGIProtocol = JsonErrorProtocol
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        wsgi_app: WSGIApp = self.asgi  # what the command line names: the Flask app
        self.asgi = BufferedWSGI(wsgi_app, threads=self.cfg.threads)


_SECRETS = [
    # API keys as the service issues them ("oc_" and 43 URL-safe characters), and any
    # long token after "Bearer", in any case.
    (re.compile(r"oc_[A-Za-z0-9_\-]{8,}"), "oc_[redacted]"),
    (re.compile(r"(?i)(bearer)([\s:=]+)[^\s\"',;]+"), r"\1\2[redacted]"),
    (re.compile(r"(?i)(password|passwd|secret|token)=[^&\s\"']*"), r"\1=[redacted]"),
    # user:password@ in a URL, a password holding "/" and a URL missing a slash
    # ("redis:/:pw@host") included. Bounded, possessive, and started only where a scheme
    # can start: an unbounded pattern backtracked quadratically on a long client-chosen
    # path in the access log.
    (
        re.compile(
            r"(?i)(?<![a-z0-9+.:-])([a-z][a-z0-9+.-]{0,31}:/{0,3}[^/:@\s]{0,256}):[^@\s]{0,256}+@"
        ),
        r"\1:[redacted]@",
    ),
]


def redact(text: str) -> str:
    """``text`` without API keys, bearer tokens and passwords."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class RedactingLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, redacting keys and passwords from the error and access logs.

    A defence in depth: the service logs no request header and no query string, but a
    client can put a key anywhere, a URL path included. The service's own loggers
    (``keyservice.*``) write to gunicorn's error log through the same filter.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        redacting = _RedactingFilter()
        for handler in (*self.error_log.handlers, *self.access_log.handlers):
            handler.addFilter(redacting)
        app_log = logging.getLogger("keyservice")
        app_log.handlers = list(self.error_log.handlers)
        app_log.setLevel(logging.INFO)
        app_log.propagate = False
