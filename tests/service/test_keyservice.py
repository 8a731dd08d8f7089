"""The reference service end to end: gunicorn with several workers, PostgreSQL and Redis,
over real HTTP. Revocation and rotation must take effect on the very next request in
every worker process."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from examples.keyservice.launch import ROOT, running_service


@pytest.fixture(scope="module")
def service(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    from tests.support.services import POSTGRES_URL, REDIS_URL, require_service

    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("Redis", "127.0.0.1", 6379)
    namespace = f"ks-{uuid.uuid4().hex[:10]}"
    env = {
        "DATABASE_URL": POSTGRES_URL,
        "ORMCACHE_URL": REDIS_URL,
        "ORMCACHE_NAMESPACE": namespace,
        # The production recipe signs cached entries (see the README).
        "ORMCACHE_SECRET": f"test-secret-{uuid.uuid4().hex}",
    }
    with running_service(env, workers=3) as base:
        yield {"base": base, "namespace": namespace, **env}


def new_user(base: str) -> tuple[dict[str, Any], str]:
    tag = uuid.uuid4().hex[:10]
    resp = requests.post(
        f"{base}/users", json={"name": f"n{tag}", "email": f"{tag}@example.com"}, timeout=5
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    return body["user"], body["api_key"]


def me(base: str, key: str) -> requests.Response:
    return requests.get(f"{base}/me", headers={"Authorization": f"Bearer {key}"}, timeout=5)


def test_me_is_served_and_cached(service: dict[str, str]) -> None:
    base = service["base"]
    user, key = new_user(base)
    for _ in range(20):
        resp = me(base, key)
        assert resp.status_code == 200
        assert resp.json()["user"]["email"] == user["email"]
    stats = requests.get(f"{base}/stats", timeout=5).json()
    assert stats["hits"] > 0


def test_revocation_takes_effect_on_the_next_request_in_every_worker(
    service: dict[str, str],
) -> None:
    """Warm the cached lookup in all workers, revoke through one, and every following
    request (spread over all workers by fresh connections) is 401."""
    base = service["base"]
    _, key = new_user(base)
    for _ in range(30):
        assert me(base, key).status_code == 200
    resp = requests.post(
        f"{base}/keys/revoke", headers={"Authorization": f"Bearer {key}"}, timeout=5
    )
    assert resp.status_code == 204
    statuses = [me(base, key).status_code for _ in range(60)]
    assert statuses == [401] * 60


def test_rotation(service: dict[str, str]) -> None:
    base = service["base"]
    user, old = new_user(base)
    for _ in range(20):
        assert me(base, old).status_code == 200
    resp = requests.post(
        f"{base}/keys/rotate", headers={"Authorization": f"Bearer {old}"}, timeout=5
    )
    assert resp.status_code == 200
    new = resp.json()["api_key"]
    assert new != old
    assert [me(base, old).status_code for _ in range(30)] == [401] * 30
    assert all(me(base, new).json()["user"]["id"] == user["id"] for _ in range(30))


def test_negative_entries_never_hide_a_key_created_later(service: dict[str, str]) -> None:
    """An unknown key is cached as unknown in the workers; a commit that creates it (here
    from another process, through its own attached session) is seen on the next request."""
    from examples.keyservice.models import ApiKey, User, hash_api_key, new_api_key
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from ormcache import Cache

    base = service["base"]
    raw = new_api_key()
    assert [me(base, raw).status_code for _ in range(30)] == [401] * 30
    engine = create_engine(service["DATABASE_URL"])
    Session = sessionmaker(engine)
    # The service's secret also keys the partition tags a commit bumps.
    cache = Cache(
        service["ORMCACHE_URL"], namespace=service["namespace"], secret=service["ORMCACHE_SECRET"]
    )
    cache.attach(Session)
    tag = uuid.uuid4().hex[:10]
    with Session() as s:
        user = User(name="late", email=f"late{tag}@example.com")
        s.add(user)
        s.add(ApiKey(user=user, key_hash=hash_api_key(raw), prefix=raw[:10]))
        s.commit()
    assert [me(base, raw).status_code for _ in range(30)] == [200] * 30
    cache.close()
    engine.dispose()


def test_a_forged_entry_for_a_made_up_key_never_authenticates(
    service: dict[str, str], tmp_path: Path
) -> None:
    """Issue 12: the service never read ``ORMCACHE_SECRET``, so whoever could write to
    Redis planted an entry that authenticated a made-up API key (``/me`` answered 200 as
    user 1). With the secret from the environment every entry is signed, and a planted
    one is corrupt: deleted, a miss, and the made-up key gets 401 in every worker."""
    import redis
    from examples.keyservice import create_app
    from examples.keyservice.models import ApiKey, User, hash_api_key, new_api_key

    base = service["base"]
    victim, _ = new_user(base)
    client = redis.Redis.from_url(service["ORMCACHE_URL"])
    entries = f"{service['namespace']}:e:*"
    made_up = new_api_key()
    before = set(client.scan_iter(match=entries, count=1000))
    assert me(base, made_up).status_code == 401  # now cached as unknown: a key to plant on
    targets = set(client.scan_iter(match=entries, count=1000)) - before
    assert targets

    # The attacker runs the service's own lookup, with ormcache, against a database of
    # their own in which the made-up key belongs to the victim: a well-formed entry.
    forge_ns = f"forge-{uuid.uuid4().hex[:10]}"
    app = create_app(
        {
            "DATABASE_URL": f"sqlite:///{tmp_path}/forge.sqlite",
            "ORMCACHE_URL": service["ORMCACHE_URL"],
            "ORMCACHE_NAMESPACE": forge_ns,
            "ORMCACHE_SECRET": None,
        }
    )
    ks = app.extensions["keyservice"]
    with ks["Session"]() as s:
        user = User(id=victim["id"], name=victim["name"], email=victim["email"])
        s.add(ApiKey(user=user, key_hash=hash_api_key(made_up), prefix=made_up[:10]))
        s.commit()
    assert ks["find_key"](hash_api_key(made_up)) is not None
    (forged_key,) = client.scan_iter(match=f"{forge_ns}:e:*", count=1000)
    forged = client.get(forged_key)
    assert forged is not None
    # Its generations are the attacker's, so the header goes: nothing left to check.
    header_end = 6 + int.from_bytes(forged[4:6], "big")
    for planted in (forged, b"OCE1\x00\x00" + forged[header_end:]):
        for target in targets:
            client.set(target, planted)  # no TTL
        assert [me(base, made_up).status_code for _ in range(30)] == [401] * 30
    ks["engine"].dispose()
    client.delete(forged_key)
    client.close()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        # Nested past the parser's recursion limit, yet within the body limit (64 KiB).
        ('{"name": ' + "[" * 30_000 + "]" * 30_000 + "}", 400),
        ('{"name": "\\ud800", "email": "a@example.com"}', 422),  # a lone surrogate
        ('{"name": "n", "email": "\\udfff@example.com"}', 422),
        # 253 characters, 285 once lower-cased: past the column, yet the pattern matches.
        ('{"name": "n", "email": "' + "\u0130" * 32 + "@" + "a" * 189 + "." + "b" * 30 + '"}', 422),
    ],
    ids=["nested", "surrogate-name", "surrogate-email", "longer-after-lower"],
)
def test_hostile_bodies_get_json_4xx_never_500(
    service: dict[str, str], body: str, status: int
) -> None:
    """Issue 12: deeply nested JSON (a RecursionError), a lone surrogate in ``name`` or
    ``email``, and an e-mail that grows past its column when lower-cased (U+0130) each
    answered 500. They are JSON 4xx now."""
    resp = requests.post(
        f"{service['base']}/users",
        data=body.encode("utf-8"),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == status, resp.text[:200]
    assert resp.headers["Content-Type"].startswith("application/json")


def test_errors_are_json_and_never_leak_the_key(service: dict[str, str]) -> None:
    base = service["base"]
    secret = "oc_" + "S" * 40
    resp = me(base, secret)
    assert resp.status_code == 401
    assert resp.headers["Content-Type"].startswith("application/json")
    assert secret not in resp.text
    assert requests.get(f"{base}/me", timeout=5).status_code == 401
    bad = requests.post(f"{base}/users", data="nope", timeout=5)
    assert bad.status_code == 415
    assert bad.json()["error"]
    invalid = requests.post(f"{base}/users", json={"name": "", "email": "x"}, timeout=5)
    assert invalid.status_code == 422
    assert requests.get(f"{base}/nope", timeout=5).json()["error"] == "not_found"


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(service: dict[str, str]) -> None:
    """Property-based requests from the service's own OpenAPI document: never a 5xx."""
    st = shutil.which("st", path=str(ROOT / ".venv" / "bin")) or shutil.which("st")
    if st is None:
        pytest.fail("schemathesis is not installed: pip install 'ormcache[all]'")
    base = service["base"]
    _, key = new_user(base)
    result = subprocess.run(
        [
            st,
            "run",
            f"{base}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "-H",
            f"Authorization: Bearer {key}",
            "--url",
            base,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_serve_signs_on_redis_and_never_prints_the_password(tmp_path: Path) -> None:
    """Issue 12: ``serve`` printed the cache URL's ``?password=``, and served unsigned
    entries on a shared Redis. It now prints the URL without credentials and signs with a
    secret made for the launch when ``ORMCACHE_SECRET`` is unset."""
    import os
    import signal
    import sys

    from examples.keyservice.launch import free_port

    env = {k: v for k, v in os.environ.items() if k != "ORMCACHE_SECRET"}
    env.update(
        ORMCACHE_URL="redis://127.0.0.1:6379/0?password=hunter2",
        DATABASE_URL=f"sqlite:///{tmp_path}/serve.sqlite",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.keyservice", "serve", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert line.startswith("serving on ")
    assert "hunter2" not in line
    assert "signed with a secret made for this launch" in line


def test_demo_stopped_with_sigterm_leaves_no_server_running(tmp_path: Path) -> None:
    """Issue 12: ``python -m examples.keyservice demo`` stopped with SIGTERM left
    gunicorn running (it was a child of the stopped process). gunicorn now replaces the
    process, so the signal stops it and its workers."""
    import os
    import signal
    import sys
    import time

    from examples.keyservice.launch import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("ORMCACHE_URL", "DATABASE_URL")}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/demo.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.keyservice", "demo", "--users", "2", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the demo did not come up"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # the process we started, nothing else
        proc.wait(timeout=15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
            except requests.ConnectionError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the server still answers after SIGTERM")
    finally:
        # Whatever is left of the demo's process group (gunicorn workers, if any).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_names_in_any_script_are_stored_on_a_latin1_mariadb(mariadb_url: str) -> None:
    """A MariaDB server whose default character set is latin1 (or utf8mb3) made an emoji
    in a name a database error, and the service answered 500 (found by review): the
    service's tables are utf8mb4 whatever the server's default."""
    import uuid

    from examples.keyservice.models import Base, User
    from sqlalchemy import create_engine, select, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.orm import Session

    name = f"ks_latin1_{uuid.uuid4().hex[:8]}"
    admin = create_engine(mariadb_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET latin1"))
    engine = create_engine(make_url(mariadb_url).set(database=name))
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add(User(name="Zoë 😀 李", email="zoe@example.com"))
            s.commit()
            assert s.scalars(select(User.name)).one() == "Zoë 😀 李"
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE {name}"))
        admin.dispose()
