"""The reference service end to end: gunicorn with several workers, PostgreSQL and Redis,
over real HTTP. Revocation and rotation must take effect on the very next request in
every worker process."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
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
    cache = Cache(service["ORMCACHE_URL"], namespace=service["namespace"])
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
