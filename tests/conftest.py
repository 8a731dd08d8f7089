"""Fixtures that connect to the real services the guarantees are about.

Locally a missing service skips its tests. With ``ORMCACHE_REQUIRE_SERVICES=1`` (CI) a
missing service fails them instead, so a green run always means the real thing ran.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.redis_procs import ClusterSetup
from tests.support.services import MARIADB_URL, POSTGRES_URL, REDIS_URL, require_service
from tests.support.sql import SQLCounter


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    """A private three-node Redis Cluster, one per test module that asks for it."""
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


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
