"""In-process hit cost in CPU instructions, counted by valgrind's callgrind.

Wall-clock medians on a shared VM drift by 1.5x between minutes; instruction counts do
not (the same binary, input and hash seed give the same count whatever else the machine
is doing). Use this to compare in-process changes precisely; use ``bench_hits`` for
ratios against competitors and anything that crosses a socket.

Each case runs in its own process under callgrind twice, with 0 and with ``--calls``
calls after the same set-up; the difference divided by ``--calls`` is the cost of one
call. Everything is in memory (SQLite file + the memory backend), so no socket is timed,
except in the near-cache cases: they need Redis, and count only this process's own
instructions (the zero-timeout check of the push channel's socket is a system call, whose
kernel side callgrind does not see).

Run: ``.venv/bin/python -m benchmarks.bench_instructions`` (needs ``valgrind``:
``apt-get install valgrind``; writes ``benchmarks/results/instructions.md``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS

CASES = {
    "memoize-memory": "ormcache memoize hit (memory)",
    "memoize-near": "ormcache memoize near hit (redis near cache)",
    "fromcache-live": "ormcache FromCache hit (memory, live session)",
    "fromcache-near-live": "ormcache FromCache near hit (redis near cache, live session)",
    "fromcache-request": "ormcache FromCache hit (memory, per request)",
    "sqlalchemy-floor-live": "SQLAlchemy alone serving a ready result (live session)",
    "uncached-sqlite-live": "uncached ORM query (sqlite, live session)",
}


def build_case(name: str, workdir: str) -> Callable[[], object]:
    """Set up one case in this process and return the call to count."""
    from sqlalchemy import event, select
    from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
    from sqlalchemy.orm import sessionmaker

    from benchmarks.bench_hits import (
        BenchUser,
        key_hash,
        memoized_lookup,
        prepare,
        warm_near_cache,
    )
    from benchmarks.common import REDIS_URL
    from ormcache import Cache, FromCache

    factory = prepare(f"sqlite:///{workdir}/instructions.sqlite", 100)
    target = key_hash("k42")
    if name.endswith("-near") or "-near-" in name:
        ns = f"instructions-{os.getpid()}"
        cache = Cache(REDIS_URL, namespace=ns, default_ttl=600, near_cache=True)
    else:
        cache = Cache(namespace="instructions", default_ttl=600)
    if name in ("memoize-memory", "memoize-near"):
        cache.attach(factory)
        get_user = memoized_lookup(cache, factory)
        get_user(target)
        if name == "memoize-near":
            warm_near_cache(cache, lambda: get_user(target))
        return lambda: get_user(target)
    if name in ("fromcache-live", "fromcache-near-live"):
        cache.attach(factory)
        live = factory()
        stmt = select(BenchUser).where(BenchUser.api_key_hash == target).options(FromCache())
        live.scalars(stmt).one()
        if name == "fromcache-near-live":
            warm_near_cache(cache, lambda: live.scalars(stmt).one())
        return lambda: live.scalars(stmt).one()
    if name == "fromcache-request":
        cache.attach(factory)

        def per_request() -> object:
            with factory() as s:
                query = select(BenchUser).where(BenchUser.api_key_hash == target)
                return s.scalars(query.options(FromCache())).one()

        return per_request
    if name == "sqlalchemy-floor-live":
        # The least SQLAlchemy does for a hook-served result: a fresh instance, put in the
        # identity map as a load would, returned through do_orm_execute.
        floor_factory = sessionmaker(factory.kw["bind"])
        with floor_factory() as s:
            user = s.scalars(select(BenchUser).where(BenchUser.api_key_hash == target)).one()
            loaded = {k: v for k, v in user.__dict__.items() if not k.startswith("_sa_")}
            identity = user._sa_instance_state.key
        meta = SimpleResultMetaData(["BenchUser"])
        manager = BenchUser.__mapper__.class_manager

        @event.listens_for(floor_factory, "do_orm_execute")
        def serve(state: Any) -> Any:
            obj = manager.new_instance()
            obj_state = obj._sa_instance_state
            obj.__dict__.update(loaded)
            obj_state.key = identity
            obj_state.session_id = state.session.hash_key
            state.session.identity_map._add_unpresent(obj_state, identity)
            return IteratorResult(meta, iter([(obj,)]))

        live = floor_factory()
        stmt = select(BenchUser).where(BenchUser.api_key_hash == target)
        return lambda: live.scalars(stmt).one()
    if name == "uncached-sqlite-live":
        live = factory()
        stmt = select(BenchUser).where(BenchUser.api_key_hash == target)
        return lambda: live.scalars(stmt).one()
    raise SystemExit(f"unknown case {name!r}; choose from {', '.join(CASES)}")


def run_case(name: str, calls: int) -> None:
    """Worker mode (runs under callgrind): set up, warm up, then ``calls`` calls."""
    with tempfile.TemporaryDirectory() as workdir:
        fn = build_case(name, workdir)
        for _ in range(200):
            fn()
        for _ in range(calls):
            fn()


def count(name: str, calls: int) -> int:
    """Instructions of one run of the worker under callgrind."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.bench_instructions",
            "--worker",
            name,
            "--calls",
            str(calls),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    match = re.search(r"refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"callgrind run of {name} failed:\n{proc.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--worker", metavar="CASE", help=argparse.SUPPRESS)
    parser.add_argument("cases", nargs="*", default=list(CASES), help="cases to count")
    args = parser.parse_args(argv)
    if args.worker:
        run_case(args.worker, args.calls)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    per_call: dict[str, int] = {}
    for i, name in enumerate(args.cases, 1):
        print(f"  [{i}/{len(args.cases)}] {name}: two callgrind runs ...", file=sys.stderr)
        per_call[name] = (count(name, args.calls) - count(name, 0)) // args.calls
    floor = per_call.get("sqlalchemy-floor-live")
    lines = ["| case | instructions per call | x SQLAlchemy floor |", "|---|---:|---:|"]
    for name, n in per_call.items():
        ratio = f"{n / floor:.2f}" if floor else "-"
        lines.append(f"| {CASES[name]} | {n:,} | {ratio} |")
    text = (
        f"Instructions per call (callgrind, {args.calls} calls after set-up and warm-up, "
        "PYTHONHASHSEED=0)\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "instructions.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
