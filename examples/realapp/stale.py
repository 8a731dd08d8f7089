"""Two processes against ihatemoney on PostgreSQL + Redis: does any cached read go stale?

* The **writer** changes a project through the app's own views (Flask test client, logged
  in): it adds, edits and deletes bills and changes members' weights. After each request
  returns (its ``commit()`` has returned) it publishes the new version number, then reads
  the whole project with plain SQL on its own engine, which ormcache does not watch: the
  oracle state of that version.
* The **reader** reads through the cached paths, via the app's JSON API (project with
  balances, bill list, statistics, one member, one bill). Before each request it notes
  the last published version ``v0``, after it the version ``v1``.

A read is stale if what it returned is an older version's state: it matches no oracle
state of a version in ``[v0, v1 + 1]`` (``v1 + 1``: a commit that returned during the
read, before the writer published it). Values are compared with a 1e-6 tolerance on
amounts, since the oracle recomputes balances in its own order.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

PROJECT = "raclette"
MEMBERS = ("ann", "bob", "cid", "dee")
ENDPOINTS = ("project", "bills", "statistics", "member", "bill")
OFF = "off"


def _config(database_url: str) -> type:
    class Config:
        SQLALCHEMY_DATABASE_URI = database_url
        SECRET_KEY = uuid.uuid4().hex
        TESTING = True
        WTF_CSRF_ENABLED = False
        ENABLE_CAPTCHA = False
        PASSWORD_HASH_METHOD = "pbkdf2:sha1:1"  # noqa: S105 - a demo project's hash
        PASSWORD_HASH_SALT_LENGTH = 1
        ALLOW_PUBLIC_PROJECT_CREATION = True
        ACTIVATE_DEMO_PROJECT = False
        RATELIMIT_ENABLED = False

    return Config


def _app(database_url: str, cache_url: str, namespace: str) -> tuple[Any, Any]:
    """The app as each process of a deployment builds it: with the integration
    installed, or as shipped when ``cache_url`` is ``off`` (the uncached baseline)."""
    from ihatemoney import run

    if cache_url == OFF:
        return run.create_app(_config(database_url)), None
    os.environ["ORMCACHE_URL"] = cache_url
    os.environ["ORMCACHE_NAMESPACE"] = namespace
    from ormcache import Cache

    from .ihatemoney_cache import install

    cache = install(Cache())
    return run.create_app(_config(database_url)), cache


# -- the oracle: plain SQL, no ORM, on an engine ormcache does not watch -------------------
def oracle_state(conn: Any) -> dict[str, Any]:
    from sqlalchemy import text

    name = conn.execute(text("SELECT name FROM project WHERE id = :p"), {"p": PROJECT}).scalar()
    people = conn.execute(
        text("SELECT id, name, weight, activated FROM person WHERE project_id = :p ORDER BY id"),
        {"p": PROJECT},
    ).all()
    bills = conn.execute(
        text(
            "SELECT b.id, b.payer_id, b.amount, b.what, b.bill_type, b.converted_amount "
            "FROM bill b JOIN person p ON b.payer_id = p.id WHERE p.project_id = :p "
            "ORDER BY b.id"
        ),
        {"p": PROJECT},
    ).all()
    owers: dict[int, list[int]] = defaultdict(list)
    for bill_id, person_id in conn.execute(
        text(
            "SELECT bo.bill_id, bo.person_id FROM billowers bo "
            "JOIN person p ON bo.person_id = p.id WHERE p.project_id = :p "
            "ORDER BY bo.bill_id, bo.person_id"
        ),
        {"p": PROJECT},
    ):
        owers[bill_id].append(person_id)
    weight = {pid: w for pid, _, w, _ in people}
    paid: dict[int, float] = defaultdict(float)
    spent: dict[int, float] = defaultdict(float)
    for bill_id, payer, _amount, _what, _kind, converted in bills:
        total = sum(weight[o] for o in owers[bill_id])
        paid[payer] += converted
        for o in owers[bill_id]:
            spent[o] += weight[o] * converted / total
    members = {
        str(pid): {"name": n, "weight": w, "activated": bool(a), "balance": paid[pid] - spent[pid]}
        for pid, n, w, a in people
    }
    return {
        "project": {"name": name, "members": members},
        "bills": {
            str(b[0]): {"payer": b[1], "owers": owers[b[0]], "amount": b[2], "what": b[3]}
            for b in bills
        },
        "statistics": {
            str(pid): {"paid": paid[pid], "spent": -spent[pid], "balance": paid[pid] - spent[pid]}
            for pid, *_ in people
        },
    }


def component(state: dict[str, Any], endpoint: str, ident: str) -> Any:
    """What one API read should return, taken from a full oracle state."""
    if endpoint in ("project", "bills", "statistics"):
        return state[endpoint]
    if endpoint == "member":
        member = dict(state["project"]["members"].get(ident) or {})
        member.pop("balance", None)
        return member or None
    return state["bills"].get(ident)


# -- what the API returned, in the oracle's shape --------------------------------------
def observed(endpoint: str, status: int, body: Any) -> Any:
    if status == 404:
        return None
    if endpoint == "project":
        return {
            "name": body["name"],
            "members": {
                str(m["id"]): {
                    "name": m["name"],
                    "weight": m["weight"],
                    "activated": m["activated"],
                    "balance": m["balance"],
                }
                for m in body["members"]
            },
        }
    if endpoint == "bills":
        return {str(b["id"]): _bill(b) for b in body}
    if endpoint == "statistics":
        return {
            str(s["member"]["id"]): {
                "paid": s["paid"],
                "spent": s["spent"],
                "balance": s["balance"],
            }
            for s in body
        }
    if endpoint == "member":
        return {"name": body["name"], "weight": body["weight"], "activated": body["activated"]}
    return _bill(body)


def _bill(b: dict[str, Any]) -> dict[str, Any]:
    owers = sorted(o["id"] for o in b["owers"])
    return {"payer": b["payer_id"], "owers": owers, "amount": b["amount"], "what": b["what"]}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return abs(a - b) < 1e-6
    return bool(a == b)


# -- processes ---------------------------------------------------------------------------
def prepare(database_url: str, cache_url: str, namespace: str) -> None:
    """A fresh schema (the app's own migrations) and a project with four members."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    app, cache = _app(database_url, cache_url, namespace)
    client = app.test_client()
    data = {
        "name": PROJECT,
        "id": PROJECT,
        "password": PROJECT,
        "contact_email": "r@example.com",
        "default_currency": "XXX",
        "project_history": True,
    }
    client.post("/create", data=data)
    for name in MEMBERS:
        client.post(f"/{PROJECT}/members/add", data={"name": name})
    if cache is not None:
        cache.clear()


def writer(
    database_url: str,
    cache_url: str,
    namespace: str,
    writes: int,
    pause: float,
    version: Any,
    oracle_path: str,
) -> None:
    from sqlalchemy import create_engine

    app, _cache = _app(database_url, cache_url, namespace)
    client = app.test_client()
    client.post("/authenticate", data={"id": PROJECT, "password": PROJECT})
    oracle = create_engine(database_url)
    rng = random.Random(7)
    member_ids = list(range(1, len(MEMBERS) + 1))
    bills: list[int] = []
    next_bill = 1
    with open(oracle_path, "w") as out, oracle.connect() as conn:
        conn.commit()
        out.write(json.dumps({"v": 0, "state": oracle_state(conn)}) + "\n")
        conn.commit()
        for v in range(1, writes + 1):
            op = rng.random()
            form = {
                "date": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                "what": f"bill {v}",
                "payer": rng.choice(member_ids),
                "payed_for": rng.sample(member_ids, rng.randint(1, len(member_ids))),
                "bill_type": "Expense",
                "amount": f"{rng.randint(100, 9999) / 100:.2f}",
                "original_currency": "XXX",
            }
            if op < 0.4 or not bills:
                resp = client.post(f"/{PROJECT}/add", data=form)
                bills.append(next_bill)
                next_bill += 1
            elif op < 0.7:
                resp = client.post(f"/{PROJECT}/edit/{rng.choice(bills)}", data=form)
            elif op < 0.8:
                bill = bills.pop(rng.randrange(len(bills)))
                resp = client.post(f"/{PROJECT}/delete/{bill}")
            else:
                member = rng.choice(member_ids)
                resp = client.post(
                    f"/{PROJECT}/members/{member}/edit",
                    data={"name": MEMBERS[member - 1], "weight": rng.choice([1, 2, 3, 0.5])},
                )
            if resp.status_code not in (200, 302, 303):
                raise RuntimeError(f"write {v} answered {resp.status_code}")
            # commit() has returned: from now on no read may be served older data.
            version.value = v
            out.write(json.dumps({"v": v, "state": oracle_state(conn)}) + "\n")
            conn.commit()
            time.sleep(pause)
    oracle.dispose()


def reader(
    database_url: str,
    cache_url: str,
    namespace: str,
    seed: int,
    version: Any,
    done: Any,
    samples_path: str,
    stats_path: str,
) -> None:
    import dataclasses

    app, cache = _app(database_url, cache_url, namespace)
    client = app.test_client()
    token = base64.b64encode(f"{PROJECT}:{PROJECT}".encode()).decode()
    headers = {"Authorization": f"Basic {token}"}
    rng = random.Random(seed)
    with open(samples_path, "w") as out:
        while not done.is_set():
            endpoint = rng.choice(ENDPOINTS)
            ident = ""
            path = f"/api/projects/{PROJECT}"
            if endpoint == "bills":
                path += "/bills"
            elif endpoint == "statistics":
                path += "/statistics"
            elif endpoint == "member":
                ident = str(rng.randint(1, len(MEMBERS)))
                path += f"/members/{ident}"
            elif endpoint == "bill":
                ident = str(rng.randint(1, max(1, int(version.value * 0.4) + 2)))
                path += f"/bills/{ident}"
            v0 = version.value
            started = time.perf_counter()
            resp = client.get(path, headers=headers)
            elapsed = time.perf_counter() - started
            v1 = version.value
            body = resp.get_json(silent=True)
            sample = {"e": endpoint, "i": ident, "v0": v0, "v1": v1, "status": resp.status_code}
            sample["ms"] = round(elapsed * 1000, 3)
            sample["value"] = observed(endpoint, resp.status_code, body)
            out.write(json.dumps(sample) + "\n")
    stats = None if cache is None else dataclasses.asdict(cache.stats())
    Path(stats_path).write_text(json.dumps(stats))


_MISSING = "<missing>"
#: Leaves computed from several rows (balances, statistics): a request that runs several
#: statements at READ COMMITTED while a commit lands can mix versions in them.
_DERIVED = ("balance", "paid", "spent")


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A component flattened to {path: leaf}; a list (a bill's owers) is one leaf."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(leaves(v, f"{prefix}.{k}"))
        return out or {prefix: {}}
    return {prefix: value}


def classify(sample: dict[str, Any], states: dict[int, Any], last: int) -> str:
    """One read's verdict.

    * ``ok``: it equals the state of a version it may see, ``[v0, v1 + 1]``.
    * ``stale``: it equals only older versions' state, or a stored value in it (a
      name, a weight, an amount, a bill's payer or owers, a bill's existence) is not in
      any of those versions but is in an older one: the read was served data older than
      a commit that had returned.
    * ``wrong``: such a value is in no version at all.
    * ``torn``: every stored value is current, but the whole matches no single version:
      a balance computed by one statement and names read by another, or a bill read by
      one statement and its owers by the next after the bill was deleted (no owers),
      with a commit in between. That is READ COMMITTED across a request's statements,
      with or without a cache (the uncached run measures it too).
    """
    e, i = sample["e"], sample["i"]
    allowed = range(sample["v0"], min(sample["v1"] + 1, last) + 1)
    got = sample["value"]
    if any(same(got, component(states[v], e, i)) for v in allowed):
        return "ok"
    if any(same(got, component(states[v], e, i)) for v in range(sample["v0"])):
        return "stale"
    seen = leaves(got)
    versions = {v: leaves(component(states[v], e, i)) for v in range(allowed.stop)}
    verdict = "torn"
    for path in sorted(set(seen).union(*(versions[v] for v in allowed))):
        if path.rsplit(".", 1)[-1] in _DERIVED:
            continue
        leaf = seen.get(path, _MISSING)
        if any(same(leaf, versions[v].get(path, _MISSING)) for v in allowed):
            continue
        if path.endswith(".owers") and leaf == [] and any(path not in versions[v] for v in allowed):
            # The bill was deleted while the request ran: the query read its row, and
            # its owers (a second statement, subqueryload) after the delete committed.
            continue
        if any(same(leaf, versions[v].get(path, _MISSING)) for v in range(sample["v0"])):
            return "stale"
        verdict = "wrong"
    return verdict


def analyse(oracle_path: str, samples_paths: list[str]) -> dict[str, Any]:
    states = {}
    with open(oracle_path) as fh:
        for line in fh:
            row = json.loads(line)
            states[row["v"]] = row["state"]
    last = max(states)
    verdicts: Counter[str] = Counter()
    times: dict[str, list[float]] = defaultdict(list)
    by_endpoint: dict[str, Counter[str]] = defaultdict(Counter)
    examples: list[dict[str, Any]] = []
    for path in samples_paths:
        with open(path) as fh:
            for line in fh:
                s = json.loads(line)
                verdict = classify(s, states, last)
                times[s["e"]].append(s.get("ms", 0.0))
                verdicts[verdict] += 1
                by_endpoint[s["e"]][verdict] += 1
                if verdict in ("stale", "wrong") and len(examples) < 5:
                    examples.append(s)
    return {
        "writes": last,
        "reads": sum(verdicts.values()),
        **{k: verdicts[k] for k in ("ok", "torn", "stale", "wrong")},
        "by_endpoint": {e: dict(c) for e, c in sorted(by_endpoint.items())},
        "median_ms": {e: round(statistics.median(t), 2) for e, t in sorted(times.items())},
        "examples": examples,
    }


def run(
    database_url: str,
    cache_url: str,
    *,
    writes: int = 400,
    pause: float = 0.05,
    readers: int = 1,
    workdir: str | None = None,
) -> dict[str, Any]:
    namespace = f"realapp-stale-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    prepare(database_url, cache_url, namespace)
    version = ctx.Value("q", 0, lock=False)
    done = ctx.Event()
    base = Path(workdir or tempfile.gettempdir()) / namespace
    oracle_path = f"{base}-oracle.jsonl"
    samples = [f"{base}-reader{i}.jsonl" for i in range(readers)]
    stats = [f"{base}-reader{i}-stats.json" for i in range(readers)]
    procs = [
        ctx.Process(
            target=reader,
            args=(database_url, cache_url, namespace, i, version, done, samples[i], stats[i]),
        )
        for i in range(readers)
    ]
    for p in procs:
        p.start()
    time.sleep(3.0)  # the readers import the app and warm up
    started = time.monotonic()
    w = ctx.Process(
        target=writer,
        args=(database_url, cache_url, namespace, writes, pause, version, oracle_path),
    )
    w.start()
    w.join()
    done.set()
    for p in procs:
        p.join()
    if w.exitcode != 0 or any(p.exitcode != 0 for p in procs):
        raise RuntimeError("a writer or reader process failed; see its traceback above")
    result = analyse(oracle_path, samples)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["cache"] = [json.loads(Path(s).read_text()) for s in stats]
    _, cache = _app(database_url, cache_url, namespace)
    if cache is not None:
        cache.clear()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("REALAPP_DATABASE_URL"))
    parser.add_argument(
        "--cache-url", default="redis://127.0.0.1:6379/0", help="a cache URL, or off"
    )
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--readers", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or REALAPP_DATABASE_URL) names a PostgreSQL database")
    result = run(
        args.database_url,
        args.cache_url,
        writes=args.writes,
        pause=args.pause,
        readers=args.readers,
    )
    print(json.dumps(result, indent=2))
    return 0 if result["stale"] == 0 and result["wrong"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
