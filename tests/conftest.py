"""Fixtures that connect to the real services the guarantees are about.

Locally a missing service skips its tests. With ``ORMCACHE_REQUIRE_SERVICES=1`` (CI) a
missing service fails them instead, so a green run always means the real thing ran.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

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


@pytest.fixture
def namespace() -> str:
    """A namespace no other test shares, so tests never see each other's keys."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
def postgres_url() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


@pytest.fixture
def mariadb_url() -> str:
    require_service("MariaDB", "127.0.0.1", 3306)
    return MARIADB_URL


@pytest.fixture(params=["memory", "redis"])
def cache_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every cache-level test runs on the embedded default and on real Redis."""
    if request.param == "memory":
        yield "memory://"
    else:
        yield request.getfixturevalue("redis_url")


class SQLCounter:
    """Counts statements sent to the database, the oracle for "a hit runs no SQL"."""

    def __init__(self, engine: object) -> None:
        from sqlalchemy import event

        self.count = 0
        self.statements: list[str] = []

        def before(conn: object, cursor: object, statement: str, *args: object) -> None:
            self.count += 1
            self.statements.append(statement)

        event.listen(engine, "before_cursor_execute", before)

    def reset(self) -> None:
        self.count = 0
        self.statements.clear()


@pytest.fixture
def sqlite_engine(tmp_path: object) -> Iterator[object]:
    from sqlalchemy import create_engine

    from tests.models import Base

    engine = create_engine(f"sqlite:///{tmp_path}/oc.db")  # type: ignore[str-bytes-safe]
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sql_counter(sqlite_engine: object) -> SQLCounter:
    return SQLCounter(sqlite_engine)


@pytest.fixture
def cache(cache_url: str, namespace: str) -> Iterator[object]:
    """A strict cache (the default in tests) on each backend, in its own namespace."""
    from ormcache import Cache

    c = Cache(cache_url, namespace=namespace, strict=True, default_ttl=60)
    yield c
    c.clear()
    c.close()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_engine(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[object]:
    """Each database the guarantees must hold on, with the shared test tables fresh."""
    from sqlalchemy import create_engine

    from tests.models import Base

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/oc.db"
    elif request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = request.getfixturevalue("mariadb_url")
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()
