"""The Flask extension: config mapping, Flask-SQLAlchemy, and the seed's failure pinned."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from flask import Flask, jsonify
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ormcache import Cache, UncacheableValueError
from ormcache.errors import ConfigurationError


def test_init_app_maps_config_and_registers(cache_url: str, namespace: str) -> None:
    """``ORMCACHE_*`` keys become constructor arguments; state lives in app.extensions."""
    app = Flask(__name__)
    app.config.update(
        ORMCACHE_URL=cache_url,
        ORMCACHE_NAMESPACE=namespace,
        ORMCACHE_DEFAULT_TTL="42",
        ORMCACHE_STRICT="true",
        ORMCACHE_SECRET="s3cret",
    )
    cache = Cache()
    cache.init_app(app)
    assert app.extensions["ormcache"] is cache
    assert cache.namespace == namespace
    assert cache.default_ttl == 42.0
    assert cache.strict is True
    assert cache.url == cache_url

    @cache.memoize
    def f(x: int) -> int:
        return x + 1

    assert f(1) == f(1) == 2
    assert cache.stats().hits == 1
    cache.clear()
    cache.close()


def test_init_app_rejects_unknown_and_malformed_keys() -> None:
    app = Flask(__name__)
    app.config["ORMCACHE_TTL"] = 5  # a typo of ORMCACHE_DEFAULT_TTL
    with pytest.raises(ConfigurationError, match="ORMCACHE_DEFAULT_TTL"):
        Cache().init_app(app)
    app = Flask(__name__)
    app.config["ORMCACHE_STRICT"] = "maybe"
    with pytest.raises(ConfigurationError, match="boolean"):
        Cache().init_app(app)


class FsaBase(DeclarativeBase):
    pass


def test_flask_sqlalchemy_session_is_attached_and_hits_merge_into_it(
    cache_url: str, namespace: str, tmp_path: Any
) -> None:
    """With Flask-SQLAlchemy 3.x: attach to db.session; a memoized lookup inside a request
    merges its hit into the request's session; a commit invalidates it."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/fsa.db",
        ORMCACHE_URL=cache_url,
        ORMCACHE_NAMESPACE=namespace,
        ORMCACHE_STRICT=True,
    )
    db = SQLAlchemy(app, model_class=FsaBase)

    class Member(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = f"fsa_members_{uuid.uuid4().hex[:6]}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50), unique=True)

    cache = Cache()
    cache.init_app(app)
    cache.attach(db.session)

    @cache.memoize(merge=True)
    def by_name(name: str) -> Any:
        return db.session.scalars(select(Member).where(Member.name == name)).one_or_none()

    @app.get("/m/<name>")
    def show(name: str) -> Any:
        member = by_name(name)
        if member is None:
            return jsonify(found=False)
        assert member in db.session
        return jsonify(found=True, name=member.name, id=member.id)

    @app.post("/m/<name>/rename/<new>")
    def rename(name: str, new: str) -> Any:
        member = db.session.scalars(select(Member).where(Member.name == name)).one()
        member.name = new
        db.session.commit()
        return jsonify(ok=True)

    with app.app_context():
        db.create_all()
        db.session.add(Member(id=1, name="ann"))
        db.session.commit()
    client = app.test_client()
    assert client.get("/m/ann").json == {"found": True, "name": "ann", "id": 1}
    assert client.get("/m/ann").json == {"found": True, "name": "ann", "id": 1}
    assert cache.stats().hits == 1
    assert client.post("/m/ann/rename/bea").json == {"ok": True}
    assert client.get("/m/ann").json == {"found": False}
    assert client.get("/m/bea").json == {"found": True, "name": "bea", "id": 1}
    with app.app_context():
        db.drop_all()
    cache.clear()
    cache.close()


def test_service_keeps_answering_when_its_lookup_cannot_be_cached(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's outage, pinned: the memoized key lookup is asked to cache a value the
    codec refuses. In non-strict mode every request still answers 200 (uncached), and the
    problem is logged once, without the key."""
    from examples.keyservice import create_app

    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path}/ks.db", "ORMCACHE_STRICT": False})
    cache: Cache = app.extensions["ormcache"]

    def refuse(value: object, **_: object) -> bytes:
        raise UncacheableValueError(
            "value['_sa_instance_state'] is SQLAlchemy internal state; return the object "
            "or ormcache.as_dict(obj)",
            path="value['_sa_instance_state']",
        )

    client = app.test_client()
    created = client.post("/users", json={"name": "Seed", "email": "seed@example.com"})
    key = created.json["api_key"]
    monkeypatch.setattr(cache._core.codec, "encode", refuse)
    with caplog.at_level(logging.WARNING, logger="ormcache"):
        statuses = [
            client.get("/me", headers={"Authorization": f"Bearer {key}"}).status_code
            for _ in range(10)
        ]
    assert statuses == [200] * 10
    assert cache.stats().uncacheable == 10
    assert cache.stats().stores == 0
    assert len([r for r in caplog.records if "cannot be cached" in r.getMessage()]) == 1
    assert key not in caplog.text


def test_custom_types_survive_init_app() -> None:
    """Regression: init_app rebuilt the codec and forgot types registered before it."""

    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

    cache = Cache()
    cache.register_type(Money, name="money", encode=lambda m: m.cents, decode=Money)
    app = Flask(__name__)
    app.config["ORMCACHE_NAMESPACE"] = f"ct-{uuid.uuid4().hex[:6]}"
    cache.init_app(app)

    @cache.memoize
    def price() -> Money:
        return Money(250)

    assert price().cents == price().cents == 250
    assert cache.stats().hits == 1


def test_a_second_app_with_other_settings_is_refused(namespace: str) -> None:
    """Issue 10 §5: ``init_app`` on one Cache shared by two apps reconfigured it, so the
    last app's settings applied to both and the counters reset. A second app must ask
    for the same settings; different ones are refused, and the first app keeps its own."""
    first, second = Flask("first"), Flask("second")
    first.config.update(ORMCACHE_NAMESPACE=namespace, ORMCACHE_DEFAULT_TTL=30)
    second.config.update(
        ORMCACHE_NAMESPACE=f"{namespace}-b", ORMCACHE_DEFAULT_TTL=30, ORMCACHE_SECRET="s3cr3t"
    )
    cache = Cache()
    cache.init_app(first)

    @cache.memoize
    def f(x: int) -> int:
        return x

    assert f(1) == f(1) == 1
    backend = cache.backend
    with pytest.raises(ConfigurationError, match="own Cache") as raised:
        cache.init_app(second)
    message = str(raised.value)
    assert "'first'" in message
    assert "'second'" in message
    assert f"namespace '{namespace}' -> '{namespace}-b'" in message
    assert "secret" in message
    assert "s3cr3t" not in message
    assert "ormcache" not in second.extensions
    assert cache.namespace == namespace
    assert cache.backend is backend
    assert cache.stats().hits == 1
    cache.close()


def test_apps_with_the_same_settings_share_one_cache(namespace: str) -> None:
    """An application factory called once per test, with the same config, reuses the
    Cache as it is: same backend, counters kept. The same app may change its settings."""

    def create_app() -> Flask:
        app = Flask("factory")
        app.config.update(ORMCACHE_NAMESPACE=namespace, ORMCACHE_DEFAULT_TTL="30")
        return app

    cache = Cache()
    app1 = create_app()
    cache.init_app(app1)

    @cache.memoize
    def f(x: int) -> int:
        return x

    assert f(1) == f(1) == 1
    backend = cache.backend
    app2 = create_app()
    cache.init_app(app2)
    assert app2.extensions["ormcache"] is cache
    assert cache.backend is backend
    assert cache.stats().hits == 1
    assert f(1) == 1
    assert cache.stats().hits == 2
    app2.config["ORMCACHE_DEFAULT_TTL"] = 10
    cache.init_app(app2)
    assert cache.default_ttl == 10
    cache.close()


def test_flask_caching_config_left_behind_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 10 §6: an app migrated from flask-caching kept ``CACHE_REDIS_URL`` and no
    ``ORMCACHE_URL``; ormcache quietly used per-process memory, and under two gunicorn
    workers a revoked key alternated 401 and 200."""
    app = Flask("migrated")
    app.config.update(CACHE_TYPE="RedisCache", CACHE_REDIS_URL="redis://:hunter2@cache:6379/0")
    with (
        caplog.at_level(logging.WARNING, logger="ormcache"),
        pytest.warns(UserWarning, match="ORMCACHE_URL"),
    ):
        Cache().init_app(app)
    logged = [r.getMessage() for r in caplog.records if r.name == "ormcache"]
    assert len(logged) == 1
    assert "CACHE_REDIS_URL, CACHE_TYPE" in logged[0]
    assert "per-process memory" in logged[0]
    assert "hunter2" not in logged[0]


def test_no_warning_when_the_cache_is_shared(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    for config, cache in [
        ({"ORMCACHE_URL": redis_url, "ORMCACHE_NAMESPACE": namespace}, Cache()),
        ({}, Cache(redis_url, namespace=namespace)),
    ]:
        app = Flask("migrated")
        app.config.update(CACHE_TYPE="RedisCache", CACHE_REDIS_URL=redis_url, **config)
        with caplog.at_level(logging.WARNING, logger="ormcache"), warnings.catch_warnings():
            warnings.simplefilter("error")
            cache.init_app(app)
        assert not caplog.records
        cache.close()


_FORK_SCRIPT = """
import logging, os, sys
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from ormcache import Cache

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="LOG %(message)s")
url, attach = sys.argv[1], sys.argv[2] == "attach"
cache = Cache(url, namespace=sys.argv[3])
if attach:
    cache.attach(sessionmaker(create_engine("sqlite://")))
for _ in range(2):  # two workers
    pid = os.fork()
    if pid == 0:
        sys.stderr.flush()
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.mark.parametrize(
    ("url", "attach", "warned"),
    [("memory://", "attach", True), ("memory://", "no", False), ("redis", "attach", False)],
)
def test_memory_cache_in_a_forked_worker_is_warned_about(
    url: str,
    attach: str,
    warned: bool,
    namespace: str,
    tmp_path: Any,
    request: pytest.FixtureRequest,
) -> None:
    """A memory:// cache attached in a master that forks workers (gunicorn --preload)
    is one copy per worker: each worker says so, once, naming redis://."""
    import subprocess
    import sys

    if url == "redis":
        url = request.getfixturevalue("redis_url")
    script = tmp_path / "fork.py"
    script.write_text(_FORK_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), url, attach, namespace],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    logged = [line for line in out.stderr.splitlines() if line.startswith("LOG ")]
    if warned:
        assert len(logged) == 2, out.stderr  # one per worker
        assert "forked worker" in logged[0]
        assert "per process" in logged[0]
        assert "redis://" in logged[0]
        assert out.stderr.count("RuntimeWarning") == 2
    else:
        assert logged == [], out.stderr


def test_init_app_maps_the_resource_bounds() -> None:
    """``ORMCACHE_MAX_BYTES`` and ``ORMCACHE_GENERATION_TTL`` reach the cache's settings
    (issue 12: resource bounds configurable from app.config)."""
    app = Flask(__name__)
    app.config.update(ORMCACHE_MAX_BYTES="1048576", ORMCACHE_GENERATION_TTL="30")
    cache = Cache()
    cache.init_app(app)
    settings = cache._core.settings
    assert settings.max_bytes == 1_048_576
    assert settings.generation_ttl == 30.0
    cache.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("false", False),
        ("0", False),
        (False, False),
        ("true", True),
        ("1", True),
        (True, True),
        ("5000", 5000),
        (250, 250),
    ],
)
def test_init_app_maps_the_near_cache(value: object, expected: object, redis_url: str) -> None:
    """``ORMCACHE_NEAR_CACHE`` takes a boolean or a number of entries (``True`` is not
    one entry), and reaches the cache: off means the plain Redis backend."""
    from ormcache.backends.near import NearCache

    app = Flask(__name__)
    app.config.update(ORMCACHE_URL=redis_url, ORMCACHE_NEAR_CACHE=value)
    cache = Cache()
    cache.init_app(app)
    assert cache._core.settings.near_cache == expected
    assert isinstance(cache.backend, NearCache) is bool(expected)
    if isinstance(expected, int) and not isinstance(expected, bool):
        assert cache.backend._tables.max_entries == expected  # type: ignore[attr-defined]
    cache.close()


def test_init_app_refuses_a_bad_near_cache_setting(redis_url: str) -> None:
    app = Flask(__name__)
    app.config.update(ORMCACHE_URL=redis_url, ORMCACHE_NEAR_CACHE="sometimes")
    with pytest.raises(ConfigurationError, match="ORMCACHE_NEAR_CACHE"):
        Cache().init_app(app)
