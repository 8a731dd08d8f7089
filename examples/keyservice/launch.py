"""Start the service under gunicorn on a free loopback port (for tests and the load test).

:func:`gunicorn_command` is the production recipe, shared with ``serve``: gunicorn's
asyncio worker with the WSGI app behind a buffer (see :mod:`examples.keyservice.serving`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = "examples.keyservice:create_app()"
# The path without the query string: a client may put anything there, a key included.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gunicorn_command(
    bind: str, *, workers: int, threads: int, log_level: str = "info"
) -> list[str]:
    """The gunicorn command line that serves the key service; logs go to stdout/stderr."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        bind,
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        # Reads every request whole on an event loop before a thread runs the app, so
        # slow or stalled clients hold no thread (see serving.py).
        "--worker-class",
        "examples.keyservice.serving.Worker",
        "--logger-class",
        "examples.keyservice.serving.RedactingLogger",
        # Several workers: the master creates the tables once, before forking them.
        *(["--preload"] if workers > 1 else []),
        "--graceful-timeout",
        "5",
        # No management socket: a shared default path would tie unrelated servers together.
        "--no-control-socket",
        "--access-logfile",
        "-",
        "--access-logformat",
        ACCESS_LOG_FORMAT,
        "--error-logfile",
        "-",
        "--log-level",
        log_level,
        APP,
    ]


@contextlib.contextmanager
def running_service(
    env: dict[str, str],
    *,
    workers: int = 3,
    threads: int = 4,
    timeout: float = 30.0,
    log_path: Path | None = None,
    log_level: str = "info",
) -> Iterator[str]:
    """Yield the base URL of a gunicorn-served key service; stop it (by pid) afterwards.

    Its access and error logs go to ``log_path`` when given (else nowhere)."""
    port = free_port()
    log = open(log_path or os.devnull, "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        gunicorn_command(
            f"127.0.0.1:{port}", workers=workers, threads=threads, log_level=log_level
        ),
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode} during start-up")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not answer /health within {timeout}s")
            time.sleep(0.2)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
