"""A process of the stampede test: several threads miss the same cold key at once."""

from __future__ import annotations

import threading
import time
from typing import Any

from ormcache import Cache


def run(
    redis_url: str,
    namespace: str,
    lock: bool,
    threads: int,
    computations: Any,
    go: Any,
    results: Any,
) -> None:
    cache = Cache(redis_url, namespace=namespace, stampede_lock=lock, strict=True)

    @cache.memoize(ttl=60)
    def expensive(key: str) -> dict[str, str]:
        with computations.get_lock():
            computations.value += 1  # stands for the database query
        time.sleep(0.2)
        return {"key": key, "value": "computed"}

    answers: list[object] = []

    def caller() -> None:
        go.wait(30)
        answers.append(expensive("cold"))

    pool = [threading.Thread(target=caller) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    results.put(sum(1 for a in answers if a == {"key": "cold", "value": "computed"}))
    cache.close()
