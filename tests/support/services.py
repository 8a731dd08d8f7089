"""Where the real services are, and what to do when one is missing.

Locally a missing service skips its tests. With ``ORMCACHE_REQUIRE_SERVICES=1`` (CI) a
missing service fails them instead, so a green run always means the real thing ran.
"""

from __future__ import annotations

import os
import socket

import pytest

__all__ = ["MARIADB_URL", "POSTGRES_URL", "REDIS_URL", "REQUIRE_SERVICES", "require_service"]

REDIS_URL = os.environ.get("ORMCACHE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "ORMCACHE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_URL = os.environ.get(
    "ORMCACHE_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
)
REQUIRE_SERVICES = os.environ.get("ORMCACHE_REQUIRE_SERVICES", "") not in ("", "0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (CI) when a real service is not listening."""
    if _reachable(host, port):
        return
    message = (
        f"{name} is not reachable at {host}:{port}; start it (see .ci/run) "
        "or unset ORMCACHE_REQUIRE_SERVICES to skip these tests locally"
    )
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)
