"""Running a piece of work on several threads at once and failing the test if any
thread failed: an assertion inside a thread would otherwise only print a warning."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["run_threads"]


def run_threads(work: Callable[[int], object], count: int) -> None:
    """Run ``work(0)`` … ``work(count - 1)``, each on its own thread, and wait for all.

    Re-raises the first exception a thread raised (with how many threads failed in a
    note), so the failing assertion shows in the test's report.
    """
    errors: list[BaseException] = []
    lock = threading.Lock()

    def guarded(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        first = errors[0]
        if len(errors) > 1 and hasattr(first, "add_note"):
            first.add_note(f"{len(errors)} of {count} threads failed; this is the first")
        raise first
