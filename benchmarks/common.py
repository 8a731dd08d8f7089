"""Where the benchmarks write their results and which services they measure against.

``BENCH_REDIS_URL`` and ``BENCH_POSTGRES_URL`` point them elsewhere;
``BENCH_POSTGRES_SOCKET`` is the directory of PostgreSQL's unix socket, where the same
database is also reached with psycopg2 (the fastest way a Python process can ask it).
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
POSTGRES_SOCKET = os.environ.get("BENCH_POSTGRES_SOCKET", "/var/run/postgresql")


def postgres_socket_url() -> str:
    """``POSTGRES_URL``'s database and user, over the unix socket with psycopg2."""
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL).set(
        drivername="postgresql+psycopg2", host=None, port=None, query={"host": POSTGRES_SOCKET}
    )
    return url.render_as_string(hide_password=False)
