"""Cache-hit cost of ormcache against its real competitors, in one run, on the same data.

Every case looks up the same user by API-key hash and returns the same four columns.

* floor: a raw redis-py ``GET`` + ``msgpack.unpackb`` of ormcache's own payload;
* ormcache ``memoize`` and ``FromCache`` hits on Redis three ways: with the near cache
  (the default for ``redis://``: served from process memory once the push channel vouches
  for it), without it (``near_cache=False``: one round trip per hit), and on the
  in-process memory backend (the near cache's physical limit);
* flask-caching ``memoize`` on Redis (pickle), returning ``as_dict(user)``;
* dogpile.cache on Redis with SQLAlchemy's documented ``FrozenResult`` +
  ``merge_frozen_result`` recipe (our own implementation of that recipe);
* the uncached ORM query on SQLite and PostgreSQL, the latter both over TCP with
  psycopg 3 (the URL the other cases use) and over its unix socket with psycopg2.

Run: ``.venv/bin/python -m benchmarks.bench_hits`` (writes ``benchmarks/results/``).
Medians of per-call times over batches; ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import pickle
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
from sqlalchemy import DateTime, String, create_engine, event, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    UserDefinedOption,
    mapped_column,
    sessionmaker,
)

from benchmarks.common import POSTGRES_URL, REDIS_URL, RESULTS, postgres_socket_url
from ormcache import Cache, FromCache, as_dict


class Base(DeclarativeBase):
    pass


class BenchUser(Base):
    __tablename__ = "bench_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class DogpileFromCache(UserDefinedOption):
    """The query option of the dogpile recipe (module level: dogpile pickles results)."""

    propagate_to_loaders = False


def memoized_lookup(cache: Cache, factory: sessionmaker[Session]) -> Callable[[str], Any]:
    """The seed's lookup, memoized (the session factory is closed over, not an argument:
    arguments are part of the key)."""

    @cache.memoize(ttl=600)
    def get_user(h: str) -> BenchUser | None:
        with factory() as s:
            return s.scalars(select(BenchUser).where(BenchUser.api_key_hash == h)).one_or_none()

    return get_user


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def prepare(url: str, n_users: int) -> sessionmaker[Session]:
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as s:
        s.add_all(
            BenchUser(
                id=i,
                name=f"user{i}",
                api_key_hash=key_hash(f"k{i}"),
                created_at=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
            )
            for i in range(1, n_users + 1)
        )
        s.commit()
    return factory


NEAR = "redis near cache"
ROUND_TRIP = "redis round trip"
SOCKET_DB = "postgresql unix socket, psycopg2"


def warm_near_cache(cache: Cache, hit: Callable[[], object], timeout: float = 10.0) -> None:
    """Call ``hit`` until the near cache serves it from memory.

    The push channel comes up on a background thread after the first lookup, and until
    it vouches for the process's tables every hit takes the round trip; measuring before
    then would time the wrong path.
    """
    channel = cache.backend.channel  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit()
        before = cache.stats().near_hits
        if channel.current():
            for _ in range(5):
                hit()
            if cache.stats().near_hits - before >= 5:
                return
        time.sleep(0.01)
    raise RuntimeError(f"the near cache never served a hit: {channel.reason or 'no reason'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ormcache hit benchmarks")
    parser.add_argument("--batches", type=int, default=21)
    parser.add_argument("--per-batch", type=int, default=200, help="fewest calls per batch")
    parser.add_argument("--batch-ms", type=float, default=40.0, help="time per batch and case")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)

    import redis
    from dogpile.cache import make_region
    from flask import Flask
    from flask_caching import Cache as FlaskCache
    from sqlalchemy.orm import loading

    ns = f"bench-{uuid.uuid4().hex[:8]}"
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"{ns}.sqlite"
    databases = {"sqlite": prepare(f"sqlite:///{tmp}", args.users)}
    if not args.no_postgres:
        databases["postgresql"] = prepare(POSTGRES_URL, args.users)
        # The same rows, through the cheapest client path PostgreSQL has from Python.
        socket_engine = create_engine(postgres_socket_url())
        databases[SOCKET_DB] = sessionmaker(socket_engine, expire_on_commit=False)
    target = key_hash("k42")
    results: dict[str, float] = {}
    notes: dict[str, str] = {}
    cases: list[tuple[str, Callable[[], object]]] = []

    def run(label: str, fn: Callable[[], object]) -> None:
        # Only registered here; measured interleaved below, so a noisy neighbour slows
        # every case alike instead of whichever happened to run at that moment.
        fn()
        cases.append((label, fn))

    # Two ways to run the same lookup, applied to every contender alike:
    # * "per request": a new session and a statement built for each call, as a request
    #   handler usually does;
    # * "live session": one open session and a statement built once (a module-level
    #   constant), which leaves only the lookup itself to measure.
    def query(*options: Any) -> Any:
        return select(BenchUser).where(BenchUser.api_key_hash == target).options(*options)

    def per_request(factory: sessionmaker[Session], *options: Any) -> Callable[[], object]:
        def lookup() -> object:
            with factory() as s:
                return s.scalars(query(*options)).one()

        return lookup

    def live_session(factory: sessionmaker[Session], *options: Any) -> Callable[[], object]:
        session, prebuilt = factory(), query(*options)
        return lambda: session.scalars(prebuilt).one()

    # -- uncached queries ------------------------------------------------------------
    for name, factory in databases.items():
        run(f"uncached ORM query ({name})", per_request(factory))
    factory = databases.get("postgresql", databases["sqlite"])
    db_label = "postgresql" if "postgresql" in databases else "sqlite"
    run(f"uncached ORM query ({db_label}, live session)", live_session(factory))
    if SOCKET_DB in databases:
        run(f"uncached ORM query ({SOCKET_DB}, live session)", live_session(databases[SOCKET_DB]))
    engine = factory.kw["bind"]

    # -- ormcache --------------------------------------------------------------------
    caches = {
        # The round trip on every hit, as before the near cache (explicitly off: it is
        # the default for redis://).
        ROUND_TRIP: Cache(REDIS_URL, namespace=ns, default_ttl=600, near_cache=False),
        NEAR: Cache(REDIS_URL, namespace=f"{ns}-near", default_ttl=600, near_cache=True),
        "memory": Cache(namespace=ns, default_ttl=600, max_entries=100_000),
    }
    payload = b""
    for backend, cache in caches.items():
        # Its own sessionmaker per contender: no contender pays for another's hooks.
        oc_factory = sessionmaker(engine, expire_on_commit=False)
        cache.attach(oc_factory)

        get_user = memoized_lookup(cache, oc_factory)
        get_user(target)
        option = FromCache(ttl=600, cache=cache)
        backend_cases: list[tuple[str, Callable[[], object]]] = [
            (f"ormcache memoize hit ({backend})", lambda f=get_user: f(target)),
            (f"ormcache FromCache hit ({backend})", per_request(oc_factory, option)),
            (
                f"ormcache FromCache hit ({backend}, live session)",
                live_session(oc_factory, option),
            ),
        ]
        for label, fn in backend_cases:
            if backend == NEAR:
                warm_near_cache(cache, fn)
            run(label, fn)
        if backend == ROUND_TRIP:
            payload = cache._core.codec.encode(get_user(target))

    # -- the floor: raw GET + unpack of the same payload -----------------------------
    client = redis.Redis.from_url(REDIS_URL)
    client.set(f"{ns}:floor", payload)
    run(
        "raw redis-py GET + msgpack unpack (floor)",
        lambda: msgpack.unpackb(
            client.get(f"{ns}:floor")[4:],  # skip ormcache's 4-byte header
            raw=False,
            strict_map_key=False,
            ext_hook=lambda code, data: data,
        ),
    )

    # -- flask-caching (pickle, returning a dict as the seed fix would) --------------
    app = Flask(__name__)
    fc = FlaskCache(
        app,
        config={"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": REDIS_URL, "CACHE_KEY_PREFIX": ns},
    )

    @fc.memoize(timeout=600)
    def fc_get_user(h: str) -> dict[str, Any] | None:
        with factory() as s:
            user = s.scalars(select(BenchUser).where(BenchUser.api_key_hash == h)).one_or_none()
            return as_dict(user) if user else None

    with app.app_context():
        fc_get_user(target)
    run("flask-caching memoize hit (redis, pickle)", lambda: fc_get_user(target))

    # -- dogpile.cache + FrozenResult/merge_frozen_result (SQLAlchemy's recipe) ------
    # Our own code for the approach of SQLAlchemy's examples/dogpile_caching: a
    # do_orm_execute hook, a key from the statement's cache key rendered with its
    # parameters (to_offline_string) and md5'd, get_or_create, merge_frozen_result.
    region = make_region(key_mangler=lambda k: hashlib.md5(k.encode()).hexdigest()).configure(
        "dogpile.cache.redis", arguments={"url": REDIS_URL, "redis_expiration_time": 600}
    )
    dp_factory = sessionmaker(engine, expire_on_commit=False)
    dp_statements: dict[Any, Any] = {}

    @event.listens_for(dp_factory, "do_orm_execute")
    def dogpile_hook(state: Any) -> Any:
        if not any(isinstance(o, DogpileFromCache) for o in state.user_defined_options):
            return None
        ck = state.statement._generate_cache_key()
        key = ns + ck.to_offline_string(dp_statements, state.statement, state.parameters or {})
        frozen = region.get_or_create(key, lambda: state.invoke_statement().freeze())
        return loading.merge_frozen_result(state.session, state.statement, frozen, load=False)()

    dp_option = DogpileFromCache()
    run("dogpile.cache recipe hit (redis)", per_request(dp_factory, dp_option))
    run("dogpile.cache recipe hit (redis, live session)", live_session(dp_factory, dp_option))

    # The same recipe with a hand-written key (no statement key at all): the cheapest
    # dogpile hit there is, for reference.
    def dogpile_hand_keyed() -> object:
        with factory() as s:
            stmt = query()
            frozen = region.get_or_create(f"{ns}:dp:{target}", lambda: s.execute(stmt).freeze())
            merged = loading.merge_frozen_result(s, stmt, frozen, load=False)
            return merged().scalars().one()

    run("dogpile.cache hand-keyed hit (redis)", dogpile_hand_keyed)

    samples: dict[str, list[float]] = {label: [] for label, _ in cases}
    # Every batch runs about --batch-ms of one case, however fast the case is: a
    # 10 µs hit measured 200 times would be over in 2 ms, mostly on caches cooled by the
    # case before it.
    calls: dict[str, int] = {}
    near_before = caches[NEAR].stats()
    with app.app_context():
        for label, fn in cases:
            start = time.perf_counter()
            for _ in range(50):
                fn()
            per_call = (time.perf_counter() - start) / 50
            calls[label] = max(args.per_batch, int(args.batch_ms / 1000 / per_call))
        for r in range(args.batches + 1):
            print(f"  round {r + 1}/{args.batches + 1}", file=sys.stderr, flush=True)
            for label, fn in cases:
                n = calls[label]
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                if r:  # the first round warms up
                    samples[label].append((time.perf_counter() - start) / n)
    results.update({label: statistics.median(v) for label, v in samples.items()})
    near_after = caches[NEAR].stats()
    near_hits = near_after.near_hits - near_before.near_hits
    hits = near_after.hits - near_before.hits
    notes["near"] = (
        f"near cache, while measured: {near_hits:,} of {hits:,} hits served from memory "
        f"({near_hits / max(hits, 1):.2%}); the rest took the round trip"
    )

    # -- payload size -----------------------------------------------------------------
    with factory() as s:
        user = s.scalars(query()).one()
        pickled_dict = len(pickle.dumps(user.__dict__))
        ormcache_bytes = len(caches["memory"]._core.codec.encode(user))
    notes["payload"] = (
        f"payload bytes for one user: ormcache {ormcache_bytes} B, "
        f"pickle of user.__dict__ {pickled_dict} B ({pickled_dict / ormcache_bytes:.1f}x larger)"
    )

    report(results, notes, db_label)
    for cache in caches.values():
        cache.clear()
        cache.close()
    client.delete(f"{ns}:floor")
    for k in client.scan_iter(f"{ns}*"):
        client.delete(k)
    tmp.unlink(missing_ok=True)
    return 0


def goal(text: str, value: float, target: float, *, at_most: bool) -> str:
    """One ratio against its goal, saying plainly whether it is met."""
    met = value <= target if at_most else value >= target
    sign = "<=" if at_most else ">="
    return f"{text}: {value:.2f}x (goal {sign} {target:g}x: {'met' if met else 'MISSED'})"


def report(results: dict[str, float], notes: dict[str, str], db_label: str) -> None:
    floor = results["raw redis-py GET + msgpack unpack (floor)"]
    pg = results.get(f"uncached ORM query ({db_label})")
    lines = [
        "| case | median µs/call | x floor | x uncached query |",
        "|---|---:|---:|---:|",
    ]
    for label, secs in sorted(results.items(), key=lambda kv: kv[1]):
        vs_db = f"{secs / pg:.2f}" if pg else "—"
        lines.append(f"| {label} | {secs * 1e6:.1f} | {secs / floor:.2f} | {vs_db} |")
    table = "\n".join(lines)
    r = results

    def hit(kind: str, backend: str, live: bool = False) -> float:
        return r[f"ormcache {kind} hit ({backend}{', live session' if live else ''})"]

    memo_near = hit("memoize", NEAR)
    ratios = [
        "near cache (issue 13):",
        goal(
            "  memoize near hit / memoize hit (memory)",
            memo_near / hit("memoize", "memory"),
            1.5,
            at_most=True,
        ),
        goal("  memoize near hit / floor", memo_near / floor, 0.2, at_most=True),
    ]
    for how, live in (("per request", False), ("live session", True)):
        fc_near = hit("FromCache", NEAR, live)
        ratios.append(
            goal(
                f"  {how}: FromCache near hit / FromCache hit (memory)",
                fc_near / hit("FromCache", "memory", live),
                1.3,
                at_most=True,
            )
        )
        suffix = ", live session" if live else ""
        socket_pg = r.get(f"uncached ORM query ({SOCKET_DB}{suffix})")
        if socket_pg:
            ratios.append(
                goal(
                    f"  {how}: uncached query ({SOCKET_DB}) / FromCache near hit",
                    socket_pg / fc_near,
                    3.5 if live else 2.5,
                    at_most=False,
                )
            )
        tcp_pg = r.get(f"uncached ORM query ({db_label}{suffix})")
        if tcp_pg:
            ratios.append(
                f"  {how}: uncached query ({db_label} over TCP, psycopg 3) / FromCache near "
                f"hit: {tcp_pg / fc_near:.2f}x"
            )
        dp = r[f"dogpile.cache recipe hit (redis{suffix})"]
        ratios.append(
            goal(f"  {how}: dogpile recipe / FromCache near hit", dp / fc_near, 2, at_most=False)
            if not live
            else f"  {how}: dogpile recipe / FromCache near hit: {dp / fc_near:.2f}x"
        )
    ratios += [
        "round trip (near_cache=False), issue 9's goals:",
        goal(
            "  memoize hit (redis round trip) / floor",
            hit("memoize", ROUND_TRIP) / floor,
            1.25,
            at_most=True,
        ),
        f"  memoize hit (memory): {hit('memoize', 'memory') * 1e6:.1f} µs (goal <= 10 µs)",
        f"  FromCache hit (memory): {hit('FromCache', 'memory', True) * 1e6:.1f} µs in a live "
        f"session, {hit('FromCache', 'memory') * 1e6:.1f} µs per request "
        "(new session, statement built per call) (goal <= 40 µs)",
    ]
    for how, live in (("per request", False), ("live session", True)):
        fc_redis = hit("FromCache", ROUND_TRIP, live)
        suffix = ", live session" if live else ""
        pg_case = r.get(f"uncached ORM query ({db_label}{suffix})")
        if pg_case:
            ratios.append(
                goal(
                    f"  {how}: uncached {db_label} query / FromCache hit (redis round trip)",
                    pg_case / fc_redis,
                    4,
                    at_most=False,
                )
            )
        dp = r[f"dogpile.cache recipe hit (redis{suffix})"]
        ratios.append(
            goal(
                f"  {how}: dogpile recipe / FromCache hit (redis round trip)",
                dp / fc_redis,
                3,
                at_most=False,
            )
        )
    fc = results["flask-caching memoize hit (redis, pickle)"]
    ratios.append(f"flask-caching hit / floor: {fc / floor:.2f}x")
    text = table + "\n\n"
    text += "\n".join(f"  - {x[2:]}" if x.startswith("  ") else f"- {x}" for x in ratios)
    text += "\n- " + notes["near"] + "\n- " + notes["payload"] + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hits.md").write_text(text)
    chart(results, RESULTS / "hits.png")
    print(f"wrote {RESULTS / 'hits.md'} and {RESULTS / 'hits.png'}", file=sys.stderr)


def chart(results: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(results.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(items) + 1.2))
    colours = [
        "#e07b1a" if NEAR in k else "#2b7bba" if "ormcache" in k else "#999999" for k, _ in items
    ]
    ax.barh([k for k, _ in items], [v * 1e6 for _, v in items], color=colours)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color="#e07b1a", label="ormcache, Redis with the near cache"),
            Patch(color="#2b7bba", label="ormcache, Redis round trip or memory backend"),
            Patch(color="#999999", label="others, and the uncached queries"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.07),
    )
    ax.set_xlabel("median µs per call (lower is better)")
    ax.set_title("Cache hit cost: one user by API-key hash")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
