"""The circuit breaker on its own, driven by a hand-moved clock: a dead backend costs a
few failures, then one probe per cool-down, never one timeout per call (README
"Failure modes")."""

from __future__ import annotations

import threading

from ormcache.breaker import CircuitBreaker
from tests.support.clock import FakeClock
from tests.support.threads import run_threads


def make(threshold: int = 3, cooldown: float = 5.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(threshold=threshold, cooldown=cooldown, clock=clock), clock


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold):
        breaker.failure()
    assert breaker.is_open


def test_closed_breaker_lets_every_call_through() -> None:
    breaker, _ = make()
    assert not breaker.is_open
    assert all(breaker.allow() for _ in range(100))


def test_opens_on_the_threshold_th_consecutive_failure_and_not_before() -> None:
    """``failure()`` says which failure opened it, so the caller can log that once."""
    breaker, _ = make(threshold=3)
    assert breaker.failure() is False
    assert breaker.failure() is False
    assert breaker.allow()
    assert not breaker.is_open
    assert breaker.failure() is True
    assert breaker.is_open
    assert not breaker.allow()


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    """Failures scattered among successes (a flaky network) never open the breaker."""
    breaker, _ = make(threshold=3)
    for _ in range(10):
        breaker.failure()
        breaker.failure()
        breaker.success()
    assert not breaker.is_open
    assert breaker.allow()


def test_open_breaker_refuses_every_call_until_the_cooldown_has_passed() -> None:
    breaker, clock = make(cooldown=4.0)
    trip(breaker)
    clock.advance(3.75)
    assert not any(breaker.allow() for _ in range(10))
    clock.advance(0.25)
    assert breaker.allow()


def test_half_open_breaker_lets_exactly_one_probe_through() -> None:
    """After the cool-down one caller probes; the others keep skipping the backend until
    the probe reports, so a still-dead backend costs one timeout, not one per caller."""
    breaker, clock = make()
    trip(breaker)
    clock.advance(60)
    assert breaker.allow()
    assert not any(breaker.allow() for _ in range(10))
    clock.advance(4.9)  # a probe's call ends within socket_timeout, far below this
    assert not breaker.allow(), "an unanswered probe is still the only probe"


def test_a_successful_probe_closes_the_breaker() -> None:
    breaker, clock = make(threshold=3)
    trip(breaker)
    clock.advance(5)
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open
    assert all(breaker.allow() for _ in range(10))
    # The count started again: it takes the full threshold to open once more.
    assert breaker.failure() is False
    assert breaker.failure() is False
    assert breaker.failure() is True


def test_a_failed_probe_reopens_for_a_full_cooldown() -> None:
    breaker, clock = make(cooldown=4.0)
    trip(breaker)
    clock.advance(7)
    assert breaker.allow()
    assert breaker.failure() is True, "the failed probe re-opens the breaker"
    assert breaker.is_open
    clock.advance(3.75)
    assert not breaker.allow(), "the cool-down counts from the failed probe"
    clock.advance(0.25)
    assert breaker.allow()
    assert not breaker.allow()


def test_concurrent_callers_on_a_half_open_breaker_get_one_probe() -> None:
    """Many threads arriving together after the cool-down: exactly one is let through."""
    breaker, clock = make()
    trip(breaker)
    clock.advance(5)
    start = threading.Barrier(8)
    allowed: list[bool] = []

    def call(n: int) -> None:
        start.wait()
        allowed.extend(breaker.allow() for _ in range(100))

    run_threads(call, 8)
    assert allowed.count(True) == 1


def test_concurrent_failures_are_all_counted() -> None:
    """Failures reported by many threads at once add up exactly: the breaker opens on
    the threshold-th one, neither earlier nor later."""
    breaker, _ = make(threshold=8 * 500)
    start = threading.Barrier(8)
    opened: list[bool] = []

    def fail(n: int) -> None:
        start.wait()
        opened.extend(breaker.failure() for _ in range(500))

    run_threads(fail, 8)
    assert opened.count(True) == 1
    assert breaker.is_open


def test_writes_skip_the_backend_only_while_open_after_a_failure_that_made_callers_wait() -> None:
    """A hung backend (timeouts) makes invalidations owed without trying while the
    breaker is open; a refusing one (Redis restarting) is still tried, since a refusal
    costs nothing; and a timeout older than the cool-down no longer counts."""
    breaker, clock = make(threshold=2, cooldown=5.0)
    breaker.failure()
    breaker.failure()
    assert breaker.is_open
    assert not breaker.skips_writes(), "refusals only"
    breaker.failure(slow=True)
    assert breaker.skips_writes()
    clock.advance(4.9)
    assert breaker.skips_writes()
    clock.advance(0.2)  # half-open: the write is the probe
    assert not breaker.skips_writes()
    breaker.failure()  # the probe is refused: open again, the timeout is 5.1 s old
    assert breaker.is_open
    assert not breaker.skips_writes()
    breaker.success()
    breaker.failure(slow=True)  # closed: one timeout does not open it
    assert not breaker.skips_writes()


def test_a_probe_that_never_reports_back_expires_after_a_cool_down() -> None:
    """The one caller let through a half-open breaker may never report (an asyncio task
    cancelled mid-call, or a probe that found nothing to do): before, no one else was
    ever let through again and the cache stayed bypassed for good."""
    breaker, clock = make(threshold=1, cooldown=5.0)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.allow()  # the probe; it never reports
    assert not breaker.allow()
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.2)
    assert breaker.allow(), "the lost probe still blocks every caller"
    breaker.end_probe()  # this one made no call: the next caller may probe at once
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open
