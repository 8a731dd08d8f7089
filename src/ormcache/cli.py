"""``ormcache``: operate on a shared cache from a shell, next to the application.

Writes that ormcache cannot see (a migration, a SQL console, another service) are only
bounded by the TTL; ``ormcache invalidate`` closes that gap from the same deploy script
that ran them. The commands talk to the backend the application uses (``--url`` or
``ORMCACHE_URL``) in its namespace; they never print the URL's password.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

try:
    import click
except ImportError:  # pragma: no cover - depends on the environment
    click = None  # type: ignore[assignment]

from .backends import Backend, create_backend
from .backends.base import redact_url
from .errors import BackendError, ConfigurationError
from .protocol import NAMESPACE_TAG
from .sqla.tags import tags_for_target

__all__ = ["main"]


def _backend(ctx: Any) -> Backend:
    url: str | None = ctx.obj["url"]
    if not url:
        raise click.UsageError(
            "no cache URL: pass --url redis://host:6379/0 or set ORMCACHE_URL to the URL "
            "your application uses"
        )
    if url.split("://", 1)[0].lower() == "memory":
        raise click.UsageError(
            "memory:// lives inside one application process, out of this command's reach; "
            "pass the Redis URL your application uses"
        )
    try:
        return create_backend(url, ctx.obj["namespace"])
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc


def _fail(what: str, exc: BackendError) -> None:
    raise click.ClickException(f"{what} failed: {exc}")


def _exercise(backend: Backend) -> None:
    """Run each protocol step once on a tag and a key of the ping's own, so a server
    that refuses a command the cache needs (an ACL user without ``TIME`` or ``EVAL``, a
    read-only replica) fails here rather than silently disabling caching. Raises
    BackendError naming the step; entries of the application are untouched."""
    tag, key, token = "ormcache-cli:ping", "ormcache-cli-ping", "ormcache-cli-ping"
    step = "snapshot"
    try:
        snap = backend.snapshot([tag])
        if snap is None:
            raise BackendError("the ping's own tag is leased; run ping again")
        step = "store"
        if not backend.set(key, b"ping", 10.0, snap):
            raise BackendError("a store against a fresh snapshot was refused")
        step = "read"
        if backend.get(key) is None:
            raise BackendError("an entry just stored could not be read back")
        step = "lock"
        backend.lock(key, token, 10.0)
        backend.unlock(key, token)
        step = "lease"
        backend.acquire_lease([tag], token, 10.0)
        backend.release_lease([tag], token)
        step = "bump"
        backend.bump([tag])
        step = "delete"
        backend.delete([key])
    except BackendError as exc:
        raise BackendError(f"the {step} step: {exc}") from exc


def _fence(backend: Backend) -> None:
    """One more round trip after a bump, so that the near caches of running processes
    hold its pushes before the command reports success (see ``backends/near.py``)."""
    fence = getattr(backend, "fence", None)
    if fence is not None:
        fence()


def _check_near(backend: Backend, timeout: float = 3.0) -> str | None:
    """Check the near cache's push channel, which ``redis://`` and Sentinel use by
    default (a Cluster only when asked for: ``ping --near-cache``): it must come up
    (``HELLO 3`` and ``CLIENT TRACKING`` allowed), and a bump must reach it.

    Returns a line for the report, None where there is no near cache; raises
    BackendError if the channel cannot work (the near cache would stay off)."""
    if not hasattr(backend, "tracking_channel"):
        return None
    from ormcache.backends.near import NearCache

    served = [0]

    def count() -> None:
        served[0] += 1

    near = NearCache(backend, on_near_hit=count)
    tag, key = "ormcache-cli:near", "ormcache-cli-near"
    channel = near.channel
    deadline = time.monotonic() + timeout
    while not channel.current():
        if time.monotonic() > deadline:
            raise BackendError(
                f"the near cache's push channel did not come up within {timeout:.0f} s "
                f"({channel.reason or 'no answer'}); the user needs HELLO and CLIENT "
                "TRACKING, or set near_cache=False (ORMCACHE_NEAR_CACHE=false)"
            )
        time.sleep(0.02)
    snap = near.snapshot([tag])
    if snap is None or not near.set(key, b"near", 10.0, snap):
        raise BackendError("the near check could not store its entry")
    # The store's own push drops any copy; read it back until memory serves it.
    while served[0] == 0 and time.monotonic() < deadline:
        near.get(key)
    if served[0] == 0:
        raise BackendError("no read was served from memory: pushes do not arrive")
    near.bump([tag])
    if near.get(key) is not None:
        raise BackendError("a bumped entry was still served: pushes do not arrive")
    near.delete([key])
    channel.close()
    return "near cache push channel ok"


def _check_tables(names: tuple[str, ...], database_url: str | None) -> None:
    """Refuse table names the database does not have: a typo would otherwise "invalidate"
    nothing, exit 0, and leave the entries it meant to drop in service."""
    if not database_url:
        raise click.UsageError(
            "cannot check the table names: pass --database-url (or set "
            "ORMCACHE_DATABASE_URL or DATABASE_URL) to check them against the database, "
            "or --no-check to bump them unchecked"
        )
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        engine = create_engine(database_url)
    except (ArgumentError, ImportError) as exc:
        raise click.UsageError(f"bad --database-url: {exc}") from exc
    where = engine.url.render_as_string(hide_password=True)
    try:
        catalog = inspect(engine)
        unknown = []
        for name in names:
            schema, _, table = name.rpartition(".")
            if not catalog.has_table(table, schema=schema or None):
                unknown.append(name)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"could not read the tables of {where}: {exc}") from exc
    finally:
        engine.dispose()
    if unknown:
        raise click.UsageError(
            f"unknown table{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {where}; "
            "nothing was invalidated. Check the names (schema.table for another schema)"
        )


def _build() -> Any:
    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--url",
        envvar="ORMCACHE_URL",
        metavar="URL",
        help="the cache URL (redis://, rediss://, redis+sentinel://, redis+cluster://); "
        "default: $ORMCACHE_URL",
    )
    @click.option(
        "--namespace",
        envvar="ORMCACHE_NAMESPACE",
        default="ormcache",
        show_default=True,
        help="the application's namespace; default: $ORMCACHE_NAMESPACE",
    )
    @click.pass_context
    def cli(ctx: Any, url: str | None, namespace: str) -> None:
        """Operate on the cache an application shares through Redis."""
        ctx.obj = {"url": url, "namespace": namespace}

    @cli.command()
    @click.option("-n", "--count", default=5, show_default=True, help="round trips to time")
    @click.option(
        "--near-cache/--no-near-cache",
        default=None,
        help="check the near cache's push channel, or not; default: where the cache has "
        "one by default (redis://, rediss://, Sentinel; a Cluster's is opt-in)",
    )
    @click.pass_context
    def ping(ctx: Any, count: int, near_cache: bool | None) -> None:
        """Check that the backend answers every step the cache uses, and time a hit's
        round trip."""
        from ormcache.core import near_cache_for

        backend = _backend(ctx)
        try:
            _exercise(backend)
            notices = getattr(backend, "notices_restarts", None)
            if notices is not None and not notices():
                click.echo(
                    "warning: the server refuses INFO to this user, so the cache cannot "
                    "tell that Redis restarted from an RDB or AOF snapshot, and entries "
                    "invalidated after that snapshot could be served again; grant the "
                    "user +info, or run Redis without persistence",
                    err=True,
                )
            wanted = near_cache_for(ctx.obj["url"], near_cache)
            near = _check_near(backend) if wanted else None
            times = []
            for _ in range(max(1, count)):
                start = time.perf_counter()
                backend.get("ormcache-cli-ping")
                times.append(time.perf_counter() - start)
        except BackendError as exc:
            _fail("ping", exc)
        finally:
            backend.close()
        median = statistics.median(times) * 1e6
        click.echo(
            f"ok: {redact_url(ctx.obj['url'])} namespace {ctx.obj['namespace']!r}, "
            f"read round trip {median:.0f} µs (median of {len(times)})"
            + (f"; {near}" if near else "")
        )

    @cli.command()
    @click.argument("tables", nargs=-1)
    @click.option("--all", "everything", is_flag=True, help="everything in the namespace")
    @click.option(
        "--database-url",
        envvar=["ORMCACHE_DATABASE_URL", "DATABASE_URL"],
        metavar="URL",
        help="the application's database (SQLAlchemy URL), to check that TABLES exist; "
        "default: $ORMCACHE_DATABASE_URL, then $DATABASE_URL",
    )
    @click.option("--no-check", is_flag=True, help="bump TABLES without checking the names")
    @click.pass_context
    def invalidate(
        ctx: Any,
        tables: tuple[str, ...],
        everything: bool,
        database_url: str | None,
        no_check: bool,
    ) -> None:
        """Invalidate what read TABLES (``schema.table`` for another schema), after
        writes ormcache could not see. Entries stay in Redis but are never served.
        Table names are checked against the database first (an unknown one fails)."""
        if not tables and not everything:
            raise click.UsageError("name the tables that changed, or pass --all")
        backend = _backend(ctx)  # a bad or missing URL fails before the database is read
        if tables and not no_check:
            try:
                _check_tables(tables, database_url)
            except click.ClickException:
                backend.close()
                raise
        from sqlalchemy import MetaData, Table

        bump: set[str] = set()
        metadata = MetaData()
        for name in tables:
            schema, _, table = name.rpartition(".")
            bump |= tags_for_target(Table(table, metadata, schema=schema or None))
        if everything:
            bump.add(NAMESPACE_TAG)
        try:
            backend.bump(sorted(bump))
            _fence(backend)
        except BackendError as exc:
            _fail("invalidate", exc)
        finally:
            backend.close()
        what = "everything" if everything else ", ".join(tables)
        click.echo(f"invalidated {what} in namespace {ctx.obj['namespace']!r}")

    @cli.command()
    @click.option("--yes", is_flag=True, help="do not ask for confirmation")
    @click.pass_context
    def clear(ctx: Any, yes: bool) -> None:
        """Delete every entry and generation of the namespace (SCAN + UNLINK, in
        batches; other namespaces and in-flight commits' leases are untouched)."""
        namespace = ctx.obj["namespace"]
        backend = _backend(ctx)  # a bad or missing URL fails before the question
        if not yes and not click.confirm(
            f"delete every cache entry of namespace {namespace!r} at {redact_url(ctx.obj['url'])}?"
        ):
            backend.close()
            raise click.Abort
        click.echo(f"clearing namespace {namespace!r}...", err=True)
        start = time.monotonic()
        try:
            # Entries left by a process that has not heard of the clear yet must not
            # come back: bumping the namespace tag invalidates them too.
            backend.clear()
            backend.bump([NAMESPACE_TAG])
            _fence(backend)
        except BackendError as exc:
            _fail("clear", exc)
        finally:
            backend.close()
        click.echo(f"cleared namespace {namespace!r} in {time.monotonic() - start:.1f} s")

    return cli


def main(argv: list[str] | None = None) -> None:
    if click is None:  # pragma: no cover - depends on the environment
        sys.exit("the ormcache command needs click: pip install 'ormcache[cli]'")
    _build()(args=argv, prog_name="ormcache")
