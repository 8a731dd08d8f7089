"""Run a real application's own test suite with and without ormcache, then the stale-read
scenario, and print a summary (README "ormcache in a real application").

The application is ihatemoney (https://github.com/spiral-project/ihatemoney), pinned to
:data:`COMMIT`. It is never copied into this repository: ``setup`` clones it (or takes
``--app-dir``) and builds a separate virtualenv with the app, its test requirements and
this ormcache checkout::

    python -m examples.realapp setup --app-dir .realapp/ihatemoney   # once (Python >= 3.11)
    .appvenv/bin/python -m examples.realapp suite --app-dir .realapp/ihatemoney
    .appvenv/bin/python -m examples.realapp stale \\
        --database-url postgresql+psycopg2://postgres@127.0.0.1:5432/test
    .appvenv/bin/python -m examples.realapp all --app-dir ... --database-url ...

``suite`` runs the app's pytest suite serially three times: as shipped (the baseline),
integrated with ``ORMCACHE_URL=memory://`` and integrated with Redis (``--redis-url``, a
fresh namespace each run, cleared afterwards). It compares every test's outcome with the
baseline's and exits 1 on any difference. The suite uses in-memory SQLite (a database per
test); ``--app-database-url`` runs the three again on PostgreSQL, where one database is
emptied and refilled by every test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
import venv
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
APP_URL = "https://github.com/spiral-project/ihatemoney"
COMMIT = "52e5720ec78d32eab963cd7e73d4826ae3a16950"
VENV = REPO / ".appvenv"


def setup(app_dir: Path) -> None:
    """Clone the app at :data:`COMMIT` if needed; make ``.appvenv`` with app and ormcache."""
    if not (app_dir / "pyproject.toml").exists():
        app_dir.parent.mkdir(parents=True, exist_ok=True)
        git = ["git", "-C", str(app_dir.parent)]
        subprocess.run([*git, "clone", "-q", APP_URL, app_dir.name], check=True)  # noqa: S603
        subprocess.run(  # noqa: S603
            ["git", "-C", str(app_dir), "checkout", "-q", COMMIT],  # noqa: S607
            check=True,
        )
    if not (VENV / "bin" / "python").exists():
        venv.create(VENV, with_pip=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(  # noqa: S603 - our own virtualenv's pip
        [*pip, "-e", f"{REPO}[redis,flask]", "-e", f"{app_dir}[dev,database]"], check=True
    )


def _outcomes(junit: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314 - our own file
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        outcomes[name] = outcome
    return outcomes


def _reset_schema(database_url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def run_suite(
    app_dir: Path, mode: str, redis_url: str, workdir: Path, database_url: str | None
) -> dict[str, Any]:
    """One serial run of the app's suite: ``baseline``, ``memory`` or ``redis``, on the
    app's default in-memory SQLite or on ``database_url`` (PostgreSQL, emptied first)."""
    junit = workdir / f"{mode}.xml"
    stats = workdir / f"{mode}-stats.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if database_url:
        _reset_schema(database_url)
        env["TESTING_SQLALCHEMY_DATABASE_URI"] = database_url
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore"]
    cmd += [f"--junitxml={junit}", "ihatemoney"]
    namespace = f"realapp-{uuid.uuid4().hex[:8]}"
    if mode != "baseline":
        cmd[3:3] = ["-p", "examples.realapp.plugin"]
        env["ORMCACHE_URL"] = "memory://" if mode == "memory" else redis_url
        env["ORMCACHE_NAMESPACE"] = namespace
        env["REALAPP_STATS"] = str(stats)
    started = time.monotonic()
    subprocess.run(cmd, cwd=app_dir, env=env, stdout=subprocess.DEVNULL, check=False)  # noqa: S603
    seconds = time.monotonic() - started
    if mode == "redis":
        from ormcache import Cache

        Cache(redis_url, namespace=namespace).clear()
    return {
        "mode": mode,
        "seconds": round(seconds, 1),
        "outcomes": _outcomes(junit),
        "stats": json.loads(stats.read_text()) if stats.exists() else None,
    }


def suite(app_dir: Path, redis_url: str, database_url: str | None) -> int:
    from .ihatemoney_cache import READ_PATHS

    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            run_suite(app_dir, m, redis_url, Path(tmp), database_url)
            for m in ("baseline", "memory", "redis")
        ]
    base = runs[0]["outcomes"]
    where = "PostgreSQL" if database_url else "in-memory SQLite (the suite's default)"
    print(
        f"\nihatemoney {COMMIT[:12]} on {where}: {len(base)} tests, "
        f"{len(READ_PATHS)} cached read paths\n"
    )
    print(
        "| run | passed | failed | skipped | same as baseline | seconds | hits | misses | stores "
        "| listeners |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    status = 0
    for r in runs:
        got = r["outcomes"]
        counts = {
            k: sum(1 for v in got.values() if v == k) for k in ("passed", "failed", "skipped")
        }
        failed = counts["failed"] + sum(1 for v in got.values() if v == "error")
        diff = sorted(t for t in set(base) | set(got) if base.get(t) != got.get(t))
        st = r["stats"] or {}
        print(
            f"| {r['mode']} | {counts['passed']} | {failed} | {counts['skipped']} | "
            f"{'yes' if not diff else f'no ({len(diff)})'} | {r['seconds']} | "
            f"{st.get('hits', '-')} | {st.get('misses', '-')} | {st.get('stores', '-')} | "
            f"{st.get('do_orm_execute_listeners', '-')} |"
        )
        for t in diff:
            print(f"    {t}: baseline {base.get(t)}, {r['mode']} {got.get(t)}")
            status = 1
    failing = sorted(t for t, v in base.items() if v in ("failed", "error"))
    if failing:
        print("\nfailing in the baseline too (no network here):", ", ".join(failing))
    return status


def stale(database_url: str, redis_url: str, writes: int) -> int:
    from .stale import run

    print("\n| run | writes | reads | ok | torn | stale | wrong | hit ratio | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    status = 0
    for label, cache_url in (("Redis", redis_url), ("uncached", "off")):
        r = run(database_url, cache_url, writes=writes)
        st = r["cache"][0]
        ratio = "-" if not st else f"{st['hits'] / max(1, st['hits'] + st['misses']):.0%}"
        print(
            f"| {label} | {r['writes']} | {r['reads']} | {r['ok']} | {r['torn']} | "
            f"{r['stale']} | {r['wrong']} | {ratio} | {r['seconds']} |"
        )
        if cache_url != "off" and (r["stale"] or r["wrong"]):
            status = 1
            for example in r["examples"]:
                print("    ", json.dumps(example)[:500])
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.realapp", description=__doc__)
    parser.add_argument("command", choices=["setup", "suite", "stale", "all"])
    parser.add_argument(
        "--app-dir", type=Path, default=Path(os.environ.get("REALAPP_DIR", ".realapp/ihatemoney"))
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--database-url", default=os.environ.get("REALAPP_DATABASE_URL"))
    parser.add_argument(
        "--app-database-url",
        help="also run the suite on this PostgreSQL database (psycopg2 driver; emptied)",
    )
    parser.add_argument("--writes", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "setup":
        setup(args.app_dir.resolve())
        return 0
    status = 0
    if args.command in ("suite", "all"):
        status |= suite(args.app_dir.resolve(), args.redis_url, None)
        if args.app_database_url:
            status |= suite(args.app_dir.resolve(), args.redis_url, args.app_database_url)
    if args.command in ("stale", "all"):
        if not args.database_url:
            parser.error("stale needs --database-url (PostgreSQL, psycopg2 driver)")
        status |= stale(args.database_url, args.redis_url, args.writes)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
