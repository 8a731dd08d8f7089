"""``python -m examples.keyservice``: initialise, seed (with progress) and serve."""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys

import click

from ormcache.backends.base import redact_url

from .launch import gunicorn_command
from .models import ApiKey, User, hash_api_key, new_api_key


@click.group()
def cli() -> None:
    """The ormcache reference API-key service."""


@cli.command()
@click.option("--users", default=200, show_default=True, help="demo users to create")
@click.option("--port", default=8000, show_default=True, help="port shown in the hint")
def seed(users: int, port: int) -> None:
    """Create demo users, each with one API key; prints one key to try."""
    from . import create_app

    app = create_app()
    Session = app.extensions["keyservice"]["Session"]
    s = Session()
    first_key = None
    existing = s.query(User).count()
    with click.progressbar(range(users), label=f"seeding {users} users", file=sys.stderr) as bar:
        for i in bar:
            raw = new_api_key()
            first_key = first_key or raw
            user = User(name=f"demo{existing + i}", email=f"demo{existing + i}@example.com")
            s.add(user)
            s.add(ApiKey(user=user, key_hash=hash_api_key(raw), prefix=raw[:10]))
            if i % 100 == 99:
                s.commit()
    s.commit()
    Session.remove()
    if first_key:
        click.echo(f"try: curl -H 'Authorization: Bearer {first_key}' http://127.0.0.1:{port}/me")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="gunicorn worker processes")
@click.option("--threads", default=4, show_default=True, help="threads per worker that run the app")
def serve(host: str, port: int, workers: int, threads: int) -> None:
    """Serve with gunicorn (several workers need a shared cache: set ORMCACHE_URL).

    Each worker reads requests on an event loop and runs the app on its threads only
    once a request is complete, so slow or stalled clients hold no thread."""
    url = os.environ.get("ORMCACHE_URL", "memory://")
    if workers > 1 and url.startswith("memory"):
        raise click.UsageError(
            "several workers cannot share the in-process memory cache: a commit in one "
            "worker would not invalidate the others. Set ORMCACHE_URL=redis://... "
            "or use --workers 1"
        )
    if importlib.util.find_spec("gunicorn") is None:
        raise click.ClickException("gunicorn is not installed: pip install 'ormcache[all]'")
    env = dict(os.environ)
    signed = "signed"
    if not env.get("ORMCACHE_SECRET"):
        if url.startswith("memory"):
            signed = "unsigned: in-process, nobody else can write to it"
        else:
            # Never unsigned on a shared Redis: a secret for this launch, shared by its
            # workers. Set ORMCACHE_SECRET to share entries across hosts and restarts.
            env["ORMCACHE_SECRET"] = secrets.token_urlsafe(32)
            signed = "signed with a secret made for this launch; set ORMCACHE_SECRET"
    where = redact_url(url)
    click.echo(f"serving on http://{host}:{port} (workers={workers}, cache={where}, {signed})")
    cmd = gunicorn_command(f"{host}:{port}", workers=workers, threads=threads)
    sys.stdout.flush()
    # gunicorn replaces this process, so a signal to it (SIGTERM from a supervisor, a
    # test, Ctrl-C) reaches gunicorn's master, which stops its workers: a child would be
    # left running when only this parent is stopped.
    os.execve(sys.executable, cmd, env)  # noqa: S606 - fixed argv, no shell


@cli.command()
@click.option("--users", default=200, show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.pass_context
def demo(ctx: click.Context, users: int, port: int) -> None:
    """Seed demo users, then serve: the main job on SQLite plus the in-memory cache."""
    ctx.invoke(seed, users=users, port=port)
    ctx.invoke(serve, host="127.0.0.1", port=port, workers=1, threads=4)


if __name__ == "__main__":
    cli()
