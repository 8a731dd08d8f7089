"""The ``ormcache`` command against real Redis: what it does to a running application's
cache, and what it says when it cannot."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from ormcache import Cache
from ormcache.cli import _build
from tests.fault_workers import lookup_fn
from tests.models import seed


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Any:
    return CliRunner().invoke(_build(), list(args), env=env, input=stdin)


@pytest.fixture
def app(redis_url: str, namespace: str, sqlite_engine: Any) -> Any:
    """An application's memoized lookup, warmed, plus a way to write behind its back."""
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=2)
    cache = Cache(redis_url, namespace=namespace)
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    assert name_of(keys[0]) == "user0"
    assert name_of(keys[0]) == "user0"
    assert cache.stats().hits == 1

    # Another engine on the same database (another application): ormcache cannot see it.
    outside = create_engine(sqlite_engine.url)

    def write_outside() -> None:
        with outside.begin() as conn:
            conn.execute(text("UPDATE oc_users SET name = 'changed-' || name"))

    yield name_of, keys, write_outside, cache
    outside.dispose()
    cache.clear()
    cache.close()


@pytest.fixture
def db_url(sqlite_engine: Any) -> str:
    return str(sqlite_engine.url)


def test_invalidate_a_table_after_an_outside_write(
    app: Any, redis_url: str, namespace: str, db_url: str
) -> None:
    name_of, keys, write_outside, _ = app
    write_outside()
    assert name_of(keys[0]) == "user0"  # the write was invisible: served from cache
    result = run(
        "--url", redis_url, "--namespace", namespace, "invalidate", "oc_users",
        "--database-url", db_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "invalidated oc_users" in result.output
    assert name_of(keys[0]) == "changed-user0"


def test_invalidating_another_table_leaves_entries(
    app: Any, redis_url: str, namespace: str, db_url: str
) -> None:
    name_of, keys, write_outside, _ = app
    write_outside()
    env = {"DATABASE_URL": db_url}  # the application's own variable is read too
    result = run(
        "--url", redis_url, "--namespace", namespace, "invalidate", "oc_addresses", env=env
    )
    assert result.exit_code == 0, result.output
    assert name_of(keys[0]) == "user0"


def test_invalidate_all_and_env_configuration(app: Any, redis_url: str, namespace: str) -> None:
    name_of, keys, write_outside, _ = app
    write_outside()
    env = {"ORMCACHE_URL": redis_url, "ORMCACHE_NAMESPACE": namespace}
    result = run("invalidate", "--all", env=env)
    assert result.exit_code == 0, result.output
    assert name_of(keys[0]) == "changed-user0"


def test_clear_asks_then_empties_the_namespace(app: Any, redis_url: str, namespace: str) -> None:
    name_of, keys, write_outside, cache = app
    write_outside()
    refused = run("--url", redis_url, "--namespace", namespace, "clear", stdin="n\n")
    assert refused.exit_code == 1
    assert name_of(keys[0]) == "user0"
    result = run("--url", redis_url, "--namespace", namespace, "clear", stdin="y\n")
    assert result.exit_code == 0, result.output
    assert "cleared namespace" in result.output
    assert not list(cache.backend.client.scan_iter(f"{namespace}:e:*"))
    assert name_of(keys[0]) == "changed-user0"


def test_ping_reports_without_the_password(redis_url: str, namespace: str) -> None:
    url = redis_url.replace("redis://", "redis://:hunter2@")
    result = run("--url", url, "--namespace", namespace, "ping", "-n", "3")
    # Whatever the server makes of the password, it never appears in the output.
    assert "hunter2" not in result.output
    ok = run("--url", redis_url, "--namespace", namespace, "ping", "-n", "3")
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("ok: redis://127.0.0.1:6379")
    assert "median of 3" in ok.output


@pytest.mark.parametrize(
    "url",
    [
        "redis:/:hunter2@127.0.0.1:6379/0",  # a slash missing
        "redis:hunter2@127.0.0.1:6379/0",
        "127.0.0.1:6379?password=hunter2",  # no scheme at all
        "hunter2@127.0.0.1",
        "redis//:hunter2@127.0.0.1:6379/0",
    ],
)
def test_a_malformed_url_is_refused_without_echoing_its_password(url: str) -> None:
    """A URL that cannot be parsed cannot be redacted by its parts: the error names no
    more of it than its scheme-like head (found by review: the whole URL was echoed)."""
    result = run("--url", url, "ping", env={"ORMCACHE_URL": ""})
    assert result.exit_code == 2, result.output
    assert "hunter2" not in result.output
    assert "redis://" in result.output  # what a URL looks like


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["invalidate", "users"], "no cache URL"),
        (["--url", "memory://", "invalidate", "users"], "memory:// lives inside one"),
        (["--url", "memcached://x", "invalidate", "users"], "unsupported cache URL"),
        (["--url", "redis://127.0.0.1:6379/0", "invalidate"], "name the tables"),
    ],
)
def test_usage_errors_say_what_to_do(args: list[str], message: str) -> None:
    result = run(*args, env={"ORMCACHE_URL": ""})
    assert result.exit_code == 2
    assert message in result.output


def test_unreachable_redis_is_a_clear_failure() -> None:
    from tests.support.net import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run("--url", url, "invalidate", "users", "--no-check")
    assert result.exit_code == 1
    assert "invalidate failed" in result.output
    assert "check that it is running" in result.output


def test_the_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "ormcache"  # the environment running the tests
    assert exe.exists(), "pip install -e '.[cli]' installs the ormcache command"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for command in ("ping", "invalidate", "clear"):
        assert command in out.stdout


def test_clear_without_a_url_fails_before_asking() -> None:
    result = run("clear", env={"ORMCACHE_URL": ""})
    assert result.exit_code == 2
    assert "no cache URL" in result.output
    assert "delete every cache entry" not in result.output


def test_an_unknown_table_is_refused_and_nothing_is_bumped(
    app: Any, redis_url: str, namespace: str, db_url: str
) -> None:
    """Issue 10 §6: ``ormcache invalidate nosuchtable`` said "invalidated nosuchtable" and
    exited 0, so a typo in a deploy script left the entries it meant to drop in service."""
    name_of, keys, write_outside, _ = app
    write_outside()
    base = ("--url", redis_url, "--namespace", namespace, "invalidate")
    result = run(*base, "nosuchtable", "oc_users", "--database-url", db_url)
    assert result.exit_code == 2
    assert "unknown table nosuchtable" in result.output
    assert "nothing was invalidated" in result.output
    assert name_of(keys[0]) == "user0"  # oc_users was not bumped either

    unchecked = run(*base, "nosuchtable", env={"ORMCACHE_DATABASE_URL": "", "DATABASE_URL": ""})
    assert unchecked.exit_code == 2
    assert "cannot check the table names" in unchecked.output
    assert "--no-check" in unchecked.output

    forced = run(*base, "oc_users", "--no-check", env={"DATABASE_URL": ""})
    assert forced.exit_code == 0, forced.output
    assert name_of(keys[0]) == "changed-user0"


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[Any]:
    """A private server on which tests add ACL users (never the shared one)."""
    from tests.redis_procs import PrivateRedis

    server = PrivateRedis(str(tmp_path / "redis"))
    server.start()
    yield server
    server.kill()


def acl_user(server: Any, name: str, denied: str) -> str:
    """The URL of a new user on ``server`` who may run every command but ``denied``."""
    client = server.client()
    client.execute_command("ACL", "SETUSER", name, "on", ">pw", "~*", "+@all", f"-{denied}")
    client.close()
    return f"redis://{name}:pw@127.0.0.1:{server.port}/0"


def test_ping_fails_when_a_command_the_cache_needs_is_refused(acl_server: Any) -> None:
    """Issue 12: an ACL user without ``TIME`` silently disabled caching (every snapshot
    and store failed), while ``ormcache ping`` said ok. ping now runs each protocol step
    once and names the one that fails."""
    url = acl_user(acl_server, "notime", "time")
    result = run("--url", url, "--namespace", "acl", "ping", "-n", "1")
    assert result.exit_code != 0, result.output
    assert "snapshot step" in result.output
    assert "pw@" not in result.output
    ok = run("--url", acl_server.url, "--namespace", "acl", "ping", "-n", "1")
    assert ok.exit_code == 0, ok.output
    assert "near cache push channel ok" in ok.output


def test_ping_fails_when_the_near_cache_cannot_track(acl_server: Any) -> None:
    """An ACL user without ``CLIENT TRACKING`` would run with the near cache (the default
    on redis://) silently off: ``ping`` says so and what to do."""
    url = acl_user(acl_server, "notrack", "client|tracking")
    result = run("--url", url, "--namespace", "acl", "ping", "-n", "1")
    assert result.exit_code != 0, result.output
    assert "CLIENT TRACKING" in result.output
    assert "ORMCACHE_NEAR_CACHE=false" in result.output


def test_ping_checks_the_near_cache_where_asked(cluster: Any, redis_url: str) -> None:
    """A Cluster's near cache is opt-in, so ``ping`` leaves its channels out unless
    asked (``--near-cache``: one tracking connection per primary must come up and
    deliver); ``--no-near-cache`` leaves out the default one of ``redis://``."""
    namespace = f"cli-near-{uuid.uuid4().hex[:8]}"
    plain = run("--url", cluster.url, "--namespace", namespace, "ping", "-n", "1")
    assert plain.exit_code == 0, plain.output
    assert "near cache" not in plain.output
    checked = run("--url", cluster.url, "--namespace", namespace, "ping", "--near-cache")
    assert checked.exit_code == 0, checked.output
    assert "near cache push channel ok" in checked.output
    skipped = run("--url", redis_url, "--namespace", namespace, "ping", "--no-near-cache")
    assert skipped.exit_code == 0, skipped.output
    assert "near cache" not in skipped.output


def test_ping_warns_when_restarts_from_a_snapshot_cannot_be_noticed(acl_server: Any) -> None:
    """The cache notices a Redis restarted from an RDB or AOF snapshot by its run id,
    which it reads with ``INFO``; an ACL user without it (``-@dangerous`` is a common
    rule) still caches, without that check, and ``ping`` says so and what to do."""
    url = acl_user(acl_server, "noinfo", "info")
    result = run("--url", url, "--namespace", "acl", "ping", "-n", "1")
    assert result.exit_code == 0, result.output
    assert "refuses INFO" in result.output
    assert "+info" in result.output
    ok = run("--url", acl_server.url, "--namespace", "acl", "ping", "-n", "1")
    assert ok.exit_code == 0, ok.output
    assert "INFO" not in ok.output
