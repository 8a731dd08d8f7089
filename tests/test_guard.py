"""The Guard's debts, on their own: what a process owes a backend that failed, and how it
behaves until the debt is paid (README "Failure modes": a writer that cannot reach Redis
remembers the bump it owes and serves no hits until it is delivered; failed releases
and unlocks are owed like bumps).

The backend is the real in-process ``MemoryBackend`` behind a double that fails on
demand: the Guard's contract is about backend failures, and this is the one place they
can be produced exactly, one operation at a time. ``tests/test_faults.py`` checks the
same guarantees end to end against real redis-server processes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from ormcache.backends.base import Entry, Snapshot
from ormcache.backends.memory import MemoryBackend
from ormcache.breaker import CircuitBreaker
from ormcache.errors import BackendError
from ormcache.guard import Guard
from ormcache.protocol import NAMESPACE_TAG
from ormcache.stats import Stats
from tests.support.clock import FakeClock

COOLDOWN = 5.0


class FlakyBackend:
    """A ``MemoryBackend`` whose operations fail on demand.

    ``failing`` names the operations that raise ``BackendError`` (``"*"``: all of them);
    ``interrupt`` maps an operation to a ``BaseException`` it raises instead, as an
    asyncio task cancelled while awaiting Redis would. ``calls`` records every call that
    reached the backend, failed or not.
    """

    def __init__(self) -> None:
        self.real = MemoryBackend("guard")
        self.failing: set[str] = set()
        self.interrupt: dict[str, BaseException] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        #: Whether failures are timeouts (the backend made the caller wait).
        self.slow = False

    def _enter(self, op: str, *args: Any) -> None:
        self.calls.append((op, args))
        if op in self.interrupt:
            raise self.interrupt.pop(op)
        if op in self.failing or "*" in self.failing:
            error = BackendError(f"{op} failed (test double)")
            error.slow = self.slow
            raise error

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]

    def get(self, key: str) -> Entry | None:
        self._enter("get", key)
        return self.real.get(key)

    def snapshot(self, tags: Sequence[str]) -> Snapshot | None:
        self._enter("snapshot", tuple(tags))
        return self.real.snapshot(tags)

    def set(self, key: str, payload: bytes, ttl: float | None, snapshot: Snapshot) -> bool:
        self._enter("set", key)
        return self.real.set(key, payload, ttl, snapshot)

    def delete(self, keys: Sequence[str]) -> None:
        self._enter("delete", tuple(keys))
        self.real.delete(keys)

    def bump(self, tags: Sequence[str]) -> None:
        self._enter("bump", tuple(tags))
        self.real.bump(tags)

    def acquire_lease(self, tags: Sequence[str], token: str, ttl: float) -> None:
        self._enter("acquire_lease", tuple(tags), token)
        self.real.acquire_lease(tags, token, ttl)

    def release_lease(self, tags: Sequence[str], token: str) -> None:
        self._enter("release_lease", tuple(tags), token)
        self.real.release_lease(tags, token)

    def lock(self, key: str, token: str, ttl: float) -> bool:
        self._enter("lock", key, token)
        return self.real.lock(key, token, ttl)

    def unlock(self, key: str, token: str) -> None:
        self._enter("unlock", key, token)
        self.real.unlock(key, token)

    def clear(self) -> None:
        self._enter("clear")
        self.real.clear()

    def close(self) -> None:
        self.real.close()


class PerCall:
    """The Guard with each method call run as its own cached call.

    A failure makes the rest of the *current* call skip the backend (one call never waits
    for two timeouts); ``Cache`` gives every call a fresh context for that. Here each
    method call gets one, so a failure in one step of a test does not leak into the next.
    """

    def __init__(self, guard: Guard) -> None:
        self.raw = guard

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.raw, name)

        def in_own_call(*args: Any) -> Any:
            return contextvars.Context().run(method, *args)

        return in_own_call


class Rig:
    """A Guard over a ``FlakyBackend``, with a breaker on a hand-moved clock."""

    def __init__(self, threshold: int) -> None:
        self.backend = FlakyBackend()
        self.stats = Stats()
        self.clock = FakeClock()
        self.breaker = CircuitBreaker(threshold=threshold, cooldown=COOLDOWN, clock=self.clock)
        self.guard = PerCall(Guard(self.backend, self.stats, self.breaker))

    def store(self, key: str, payload: bytes, tags: Sequence[str]) -> None:
        """Store through the Guard, as a miss does: snapshot, then compare-and-set."""
        snap = self.guard.snapshot(tags)
        assert snap is not None
        assert self.guard.store(key, payload, 60, snap)

    def heal(self) -> None:
        self.backend.failing.clear()
        self.backend.calls.clear()


@pytest.fixture
def rig() -> Rig:
    """A Guard whose breaker stays closed, so each test sees only the debts."""
    return Rig(threshold=10_000)


def test_healthy_backend_round_trip_and_counts(rig: Rig) -> None:
    """Nothing owed: stores and hits go through, and the outcome of each store is counted."""
    rig.store("k", b"v", ["t:users"])
    assert rig.guard.get("k").payload == b"v"
    stale = rig.guard.snapshot(["t:users"])
    rig.guard.bump(["t:users"])
    assert rig.guard.store("k2", b"old", 60, stale) is False
    stats = rig.stats.snapshot()
    assert (stats.stores, stats.store_conflicts, stats.errors) == (1, 1, 0)


def test_backend_errors_never_raise_and_are_counted(rig: Rig) -> None:
    """Every operation on a failing backend returns the "call through" answer."""
    rig.store("k", b"v", ["t:users"])
    snap = rig.guard.snapshot(["t:users"])
    rig.backend.failing.add("*")
    assert rig.guard.get("k") is None
    assert rig.guard.snapshot(["t:users"]) is None
    assert rig.guard.store("k", b"v", 60, snap) is False
    assert rig.guard.lock("k", "me", 5) is None
    rig.guard.unlock("k", "me")
    rig.guard.delete(["k"])
    rig.guard.bump(["t:users"])
    rig.guard.acquire_lease(["t:users"], "w", 5)
    rig.guard.release_lease(["t:users"], "w")
    rig.guard.clear()
    # Every call but the release, owed untried: its lease had just failed.
    assert rig.stats.snapshot().errors >= 9


def test_a_failed_bump_is_owed_and_hits_are_refused_until_it_is_paid(rig: Rig) -> None:
    """An entry the failed bump should have invalidated may still look current in the
    backend, so this process serves no hit at all until the bump is delivered."""
    rig.store("users", b"u", ["t:users"])
    rig.store("orders", b"o", ["t:orders"])
    rig.backend.failing.add("bump")
    rig.guard.bump(["t:users"])
    assert rig.backend.real.get("users").payload == b"u", "the bump did not reach the backend"
    # The backend answers gets, but the debt cannot be paid: no hit, not even one on
    # another tag, and no read of the entry at all.
    rig.backend.calls.clear()
    assert rig.guard.get("orders") is None
    assert rig.guard.get("users") is None
    assert "get" not in rig.backend.ops()
    assert rig.guard.snapshot(["t:orders"]) is None, "nor a snapshot to store against"

    rig.heal()
    assert rig.guard.get("orders").payload == b"o"
    assert rig.backend.calls[0] == ("bump", (("t:users",),)), "the debt is paid first"
    assert rig.guard.get("users") is None, "the owed bump invalidated the entry"
    rig.backend.calls.clear()
    rig.guard.get("orders")
    assert rig.backend.ops() == ["get"], "paid once, then nothing is owed"


def test_owed_bumps_collapse_into_one_payment(rig: Rig) -> None:
    """Bumps of the same tags owed many times are paid as one bump of their union."""
    rig.backend.failing.add("bump")
    for _ in range(50):
        rig.guard.bump(["t:users", "t:orders"])
    rig.guard.bump(["t:users"])
    rig.heal()
    rig.guard.get("k")
    bumps = [args for op, args in rig.backend.calls if op == "bump"]
    assert bumps == [(("t:orders", "t:users"),)]


def test_an_owed_release_is_paid_when_the_backend_returns(rig: Rig) -> None:
    """A lease whose release failed would block stores on its tags until it expires;
    the Guard releases it (and bumps its tags) as soon as the backend answers again."""
    rig.guard.acquire_lease(["t:users"], "writer", 60)
    rig.backend.failing.add("release_lease")
    rig.guard.release_lease(["t:users"], "writer")
    assert rig.backend.real.snapshot(["t:users"]) is None, "still leased in the backend"

    rig.heal()
    snap = rig.guard.snapshot(["t:users"])
    assert snap is not None, "the lease was released before the snapshot"
    ops = rig.backend.ops()
    assert ops.index("release_lease") < ops.index("bump") < ops.index("snapshot")
    assert rig.backend.calls[0] == ("release_lease", (("t:users",), "writer"))
    assert rig.guard.store("k", b"v", 60, snap)


def test_a_lease_never_taken_is_not_released_later(rig: Rig) -> None:
    """If taking the lease failed there is nothing to release: only its tags are owed."""
    rig.backend.failing.update({"acquire_lease", "release_lease"})
    rig.guard.acquire_lease(["t:users"], "writer", 60)
    rig.guard.release_lease(["t:users"], "writer")
    rig.heal()
    rig.guard.get("k")
    assert rig.backend.ops() == ["bump", "get"]


def test_an_owed_unlock_is_paid_before_the_next_lock(rig: Rig) -> None:
    """A computation lock whose unlock failed would make the next miss on that key wait
    for a holder that has moved on; the next lock attempt releases it first."""
    assert rig.guard.lock("k", "first", 60) is True
    rig.backend.failing.add("unlock")
    rig.guard.unlock("k", "first")
    rig.backend.calls.clear()
    assert rig.guard.lock("k", "second", 60) is None, "unpaid: nobody can coordinate"
    assert "lock" not in rig.backend.ops()

    rig.heal()
    assert rig.guard.lock("k", "second", 60) is True
    assert rig.backend.calls == [("unlock", ("k", "first")), ("lock", ("k", "second"))]
    rig.backend.calls.clear()
    rig.guard.lock("other", "third", 60)
    assert rig.backend.ops() == ["lock"], "paid once"


def test_an_owed_unlock_never_releases_a_lock_someone_else_took_since(rig: Rig) -> None:
    """Paying a debt is the same token-checked unlock: a lock that expired and was taken
    by another process in the meantime stays theirs."""
    assert rig.guard.lock("k", "first", 60) is True
    rig.backend.failing.add("unlock")
    rig.guard.unlock("k", "first")
    rig.backend.real.unlock("k", "first")  # it expired ...
    assert rig.backend.real.lock("k", "other-process", 60)  # ... and was taken again
    rig.heal()
    assert rig.guard.lock("k", "second", 60) is False


def owed_payments(rig: Rig, fail: str, owe: Callable[[int], None], n: int) -> list[int]:
    """Run ``owe(i)`` for ``i < n`` while ``fail`` fails, heal, and return the ``i``s
    whose debt the next lock attempt paid."""
    rig.backend.failing.add(fail)
    for i in range(n):
        owe(i)
    rig.heal()
    rig.guard.lock("probe", "probe", 60)
    return [int(str(args[-1]).rpartition("-")[2]) for op, args in rig.backend.calls if op == fail]


def test_owed_unlocks_are_bounded_and_the_oldest_are_dropped(rig: Rig) -> None:
    """A long outage cannot grow the debts without bound. The oldest owed unlock is
    dropped first: its lock has long expired by itself."""
    n = 5000
    paid = owed_payments(rig, "unlock", lambda i: rig.guard.unlock(f"k{i}", f"t-{i}"), n)
    assert 0 < len(paid) < n
    assert paid == list(range(n - len(paid), n)), "the newest are kept, in order"


def test_owed_releases_are_bounded_and_the_oldest_are_dropped(rig: Rig) -> None:
    n = 5000

    def owe(i: int) -> None:
        rig.guard.acquire_lease([f"t:{i}"], f"t-{i}", 60)
        rig.guard.release_lease([f"t:{i}"], f"t-{i}")

    paid = owed_payments(rig, "release_lease", owe, n)
    assert 0 < len(paid) < n
    assert paid == list(range(n - len(paid), n)), "the newest are kept, in order"
    # Every tag is still bumped (a dropped release only leaves a lease to expire): the
    # debt, past MAX_TAGS, collapsed into the namespace tag, which every entry records.
    bumped = {tag for op, args in rig.backend.calls if op == "bump" for tag in args[0]}
    assert NAMESPACE_TAG in bumped


@pytest.mark.parametrize(
    "interruption", [KeyboardInterrupt(), asyncio.CancelledError()], ids=["interrupt", "cancel"]
)
@pytest.mark.parametrize("op", ["bump", "acquire_lease", "release_lease"])
def test_an_interrupted_invalidation_is_owed_and_re_raised(
    rig: Rig, op: str, interruption: BaseException
) -> None:
    """Interrupted mid-call, the Guard cannot know whether the bump happened: it owes it,
    and the interruption goes on to the caller unchanged."""
    rig.store("users", b"u", ["t:users"])
    if op == "release_lease":
        rig.guard.acquire_lease(["t:users"], "w", 60)
    rig.backend.interrupt[op] = interruption
    invalidate = {
        "bump": lambda: rig.guard.bump(["t:users"]),
        "acquire_lease": lambda: rig.guard.acquire_lease(["t:users"], "w", 60),
        "release_lease": lambda: rig.guard.release_lease(["t:users"], "w"),
    }[op]
    with pytest.raises(type(interruption)):
        invalidate()
    rig.backend.calls.clear()
    rig.backend.failing.add("bump")
    assert rig.guard.get("users") is None, "owed: no hit"
    assert "get" not in rig.backend.ops()
    rig.heal()
    assert rig.guard.get("users") is None, "the owed bump invalidated the entry"
    assert rig.backend.calls[-1] == ("get", ("users",))
    assert rig.backend.real.snapshot(["t:users"]) is not None, "no lease left behind"


def test_a_failed_clear_owes_the_whole_namespace(rig: Rig) -> None:
    """A clear that did not happen leaves every entry looking current: the Guard owes a
    bump of the tag every entry depends on."""
    rig.store("k", b"v", [NAMESPACE_TAG, "t:users"])
    rig.backend.failing.add("clear")
    rig.guard.clear()
    assert rig.backend.real.get("k").payload == b"v", "the clear did not happen"
    rig.heal()
    assert rig.guard.get("k") is None
    assert rig.backend.calls[0] == ("bump", ((NAMESPACE_TAG,),))


def test_after_a_failure_the_rest_of_the_call_skips_the_backend(rig: Rig) -> None:
    """One cached call waits for at most one timeout: after its first failure, its
    other backend steps are skipped (the next call tries again)."""
    guard = rig.guard.raw
    rig.backend.failing.add("get")

    def one_call() -> tuple[object, object]:
        return guard.get("k"), guard.snapshot(["t:users"])

    assert contextvars.Context().run(one_call) == (None, None)
    assert rig.backend.ops() == ["get"]
    rig.heal()
    assert rig.guard.snapshot(["t:users"]) is not None


def test_open_breaker_skips_the_backend_until_the_cooldown_then_one_probe() -> None:
    rig = Rig(threshold=3)
    rig.store("k", b"v", ["t:users"])
    rig.backend.failing.add("get")
    for _ in range(3):
        assert rig.guard.get("k") is None
    assert rig.breaker.is_open
    rig.heal()
    assert rig.guard.get("k") is None
    assert rig.guard.snapshot(["t:users"]) is None
    assert rig.backend.calls == [], "open: the backend is not touched"
    assert rig.stats.snapshot().bypasses == 2

    rig.clock.advance(COOLDOWN)
    assert rig.guard.get("k").payload == b"v", "the probe succeeds"
    assert not rig.breaker.is_open
    assert rig.guard.get("k").payload == b"v"


def test_debts_are_paid_by_the_probe_after_the_cooldown() -> None:
    """An owed bump while the breaker is open: no hit and no attempt to pay during the
    cool-down; the probe pays it, and hits on other tags resume."""
    rig = Rig(threshold=2)
    rig.store("users", b"u", ["t:users"])
    rig.store("orders", b"o", ["t:orders"])
    rig.backend.failing.add("*")
    rig.guard.bump(["t:users"])
    rig.guard.bump(["t:users"])
    assert rig.breaker.is_open
    rig.heal()
    assert rig.guard.get("orders") is None
    assert rig.backend.calls == []

    rig.clock.advance(COOLDOWN)
    assert rig.guard.get("orders").payload == b"o"
    assert rig.backend.ops() == ["bump", "get"]
    assert rig.guard.get("users") is None


def test_a_failed_payment_keeps_the_debt_and_counts_toward_the_breaker() -> None:
    rig = Rig(threshold=3)
    rig.store("orders", b"o", ["t:orders"])
    rig.backend.failing.add("bump")
    rig.guard.bump(["t:users"])
    for _ in range(2):
        assert rig.guard.get("orders") is None  # each get tries to pay, and fails
    assert rig.breaker.is_open
    rig.heal()
    rig.clock.advance(COOLDOWN)
    assert rig.guard.get("orders").payload == b"o"
    assert rig.backend.calls[0] == ("bump", (("t:users",),))


def test_an_outage_logs_one_warning_per_kind(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of failures during an outage must not flood the log."""
    rig.backend.failing.add("*")
    with caplog.at_level(logging.WARNING, logger="ormcache"):
        for _ in range(100):
            rig.guard.get("k")
            rig.guard.delete(["k"])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert any("get failed" in m for m in messages)
    assert any("delete failed" in m for m in messages)


@pytest.mark.parametrize("slow", [False, True], ids=["refused", "timed-out"])
def test_an_open_breaker_skips_commits_only_for_a_backend_that_makes_them_wait(
    slow: bool,
) -> None:
    """Redis restarting refuses connections at once; a hung Redis makes calls time out.
    With the breaker open after refusals, a commit still tries its lease, so a commit
    made once Redis is back invalidates (before, it was owed until the cool-down ended,
    while other processes stored and served what it changed: the near-cache race with
    Redis restarts saw 595 stale reads). After timeouts it is owed without trying, so a
    commit never waits on a hung backend (issue 12)."""
    rig = Rig(threshold=1)
    rig.backend.slow = slow
    rig.backend.failing.add("*")
    rig.guard.get("k")  # fails: the breaker opens
    assert rig.breaker.is_open
    rig.heal()  # Redis is back, and the cool-down has not passed
    rig.guard.acquire_lease(["t:users"], "w", 60)
    tried = "acquire_lease" in rig.backend.ops()
    assert tried is not slow
    if not slow:
        assert not rig.breaker.is_open  # the lease went through and closed it
        assert rig.guard.raw.owed_tags() == []


@pytest.mark.parametrize("slow", [False, True], ids=["refused", "timed-out"])
def test_a_failed_lease_still_tries_its_release(rig: Rig, slow: bool) -> None:
    """A lease refused (Redis restarting) leaves Redis with nothing, and one that timed
    out may run on a busy Redis after COMMIT: either way other processes may store what
    the commit changes meanwhile, and only the release's bump, done before commit()
    returns, undoes that. So the release is tried (only an open breaker after timeouts
    skips it: test_an_open_breaker_skips_commits_only_for_a_backend_that_makes_them_wait).
    Before, a lease that timed out made its release owed untried, and the race with
    CLIENT KILL under CI load read old rows."""
    rig.backend.slow = slow
    rig.backend.failing.add("acquire_lease")
    rig.guard.acquire_lease(["t:users"], "w", 60)
    rig.heal()
    rig.guard.release_lease(["t:users"], "w")
    # The release went through, and the lease's debt was paid with it.
    assert rig.backend.ops() == ["release_lease", "bump"]
    assert rig.guard.raw.owed_tags() == []


@pytest.mark.parametrize("op", ["bump", "acquire_lease", "release_lease"])
def test_a_process_that_only_writes_pays_its_debt_with_its_next_invalidation(
    rig: Rig, op: str
) -> None:
    """Until a debt is paid, other processes may serve what it should have
    invalidated; a writer that never reads must not wait for a read to pay it."""
    rig.backend.failing.add("bump")
    rig.guard.bump(["t:users"])
    assert rig.guard.raw.owed_tags() == ["t:users"]
    rig.heal()
    if op == "bump":
        rig.guard.bump(["t:orders"])
    elif op == "acquire_lease":
        rig.guard.acquire_lease(["t:orders"], "w", 60)
    else:
        rig.guard.release_lease(["t:orders"], "w")
    assert rig.backend.calls[0][0] == op
    assert rig.backend.calls[1] == ("bump", (("t:users",),))
    assert rig.guard.raw.owed_tags() == []


def test_debts_are_paid_in_the_background_when_nobody_calls() -> None:
    """A process that stops calling the cache after a failed bump (a worker between
    jobs, a script at its end) would otherwise never pay it, and other processes would
    serve what it should have invalidated: a thread of the guard's own pays once the
    backend answers, and stops when nothing is owed."""
    backend = FlakyBackend()
    breaker = CircuitBreaker(threshold=10_000, cooldown=COOLDOWN)
    guard = Guard(backend, Stats(), breaker, pay_every=0.02)
    backend.failing.add("bump")
    assert guard.bump(["t:users"]) is False
    assert guard.owed_tags() == ["t:users"]
    time.sleep(0.1)  # still failing: still owed
    assert guard.owed_tags() == ["t:users"]
    backend.failing.clear()
    deadline = time.monotonic() + 5
    while guard.owed_tags() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guard.owed_tags() == []
    assert backend.ops().count("bump") >= 2  # the failed one, then the payment
    payer = guard._payer
    deadline = time.monotonic() + 5
    while payer is not None and payer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert payer is None or not payer.is_alive(), "the payer goes on with nothing owed"


def test_the_payer_pays_as_soon_as_the_backend_is_back_not_after_the_cooldown() -> None:
    """Other processes' breakers close as soon as the backend answers again; a payer
    that waited out its own cool-down left them serving what the debt should have
    invalidated for that long. It tries every ``pay_every`` instead (it serves no
    request, so a wait costs nobody), and its success closes the breaker."""
    backend = FlakyBackend()
    breaker = CircuitBreaker(threshold=1, cooldown=60.0)
    guard = Guard(backend, Stats(), breaker, pay_every=0.02)
    backend.failing.add("bump")
    assert guard.bump(["t:users"]) is False
    assert breaker.is_open
    time.sleep(0.1)
    backend.failing.clear()
    deadline = time.monotonic() + 2
    while guard.owed_tags() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guard.owed_tags() == [], "the debt waits for the breaker's 60 s cool-down"
    assert not breaker.is_open
    guard.close()


def _wait_dead(thread: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while thread is not None and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread is None or not thread.is_alive()


def _guard_owing_a_bump() -> tuple[Guard, FlakyBackend]:
    """A guard with a background payer, owing a bump its backend keeps refusing."""
    backend = FlakyBackend()
    breaker = CircuitBreaker(threshold=10_000, cooldown=COOLDOWN)
    guard = Guard(backend, Stats(), breaker, pay_every=0.02)
    backend.failing.add("bump")
    assert guard.bump(["t:users"]) is False
    return guard, backend


def test_a_closed_guard_pays_once_and_stops_paying() -> None:
    """Closing the cache pays what the backend will take now, then stops: a payer left
    running retries a closed (or long dead) backend for the rest of the process."""
    guard, backend = _guard_owing_a_bump()
    payer = guard._payer
    assert payer is not None
    assert payer.is_alive()
    guard.close()
    assert _wait_dead(payer), "the payer goes on after close()"
    tries = backend.ops().count("bump")
    time.sleep(0.1)
    assert backend.ops().count("bump") == tries, "a closed guard still calls its backend"
    guard.bump(["t:orders"])  # a call that was under way when the cache closed
    assert _wait_dead(guard._payer)


def test_a_dropped_guard_still_pays_its_debt_then_its_payer_ends() -> None:
    """A cache dropped (or reconfigured away) while it owes a bump: other processes may
    serve what the bump invalidates until it is paid, so the payer keeps the guard until
    then, and no longer (found by review: a weakly held guard lost its debt)."""
    import gc
    import weakref

    guard, backend = _guard_owing_a_bump()
    payer = guard._payer
    gone = weakref.ref(guard)
    del guard
    gc.collect()
    assert gone() is not None, "the debt was dropped with its guard"
    backend.failing.clear()
    assert _wait_dead(payer), "the payer goes on with nothing owed"
    assert backend.ops().count("bump") >= 2  # the failed one, then the payment
    gc.collect()
    assert gone() is None, "a guard that owes nothing is kept alive"


def test_closing_with_debts_left_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """``close()`` during an outage cannot deliver what is owed: it says how much, since
    other processes may serve what it invalidates until their entries expire."""
    guard, _backend = _guard_owing_a_bump()
    with caplog.at_level(logging.WARNING, logger="ormcache"):
        guard.close()
    assert "undelivered invalidations: 1" in caplog.text


def test_a_debt_of_only_a_release_is_paid(rig: Rig) -> None:
    """A payment that ran between the bump and the release of a failed commit being
    recorded (the background payer, another thread) left a release owed with no tags:
    the guard took that for nothing owed, so the lease blocked stores on its tags until
    it expired and the payer thread never stopped. The tags and the release are now
    recorded together, and a release alone is still a debt."""
    rig.guard.acquire_lease(["t:users"], "w", 60)
    rig.backend.failing.add("release_lease")
    rig.guard.release_lease(["t:users"], "w")
    guard = rig.guard.raw
    with guard._owed_lock:  # the state the payment in between left
        guard._owed.clear()
    rig.heal()
    assert rig.guard.snapshot(["t:users"]) is not None, "the leftover lease blocks stores"
    assert rig.backend.ops()[0] == "release_lease"
    assert not guard._owes()


def test_a_debt_taken_on_while_a_payment_runs_is_not_lost(rig: Rig) -> None:
    """The background payer pays while the application's threads go on: a commit whose
    bump of a tag fails while a payment of that same tag is under way owes a bump for a
    write the payment may predate. Before, the payment then struck the tag off, and the
    later write was never invalidated in other processes."""
    rig.backend.failing.add("bump")
    rig.guard.bump(["t:users"])
    rig.heal()
    guard = rig.guard.raw
    real_bump = rig.backend.real.bump

    def bump_while_another_commit_fails(tags: Sequence[str]) -> None:
        real_bump(tags)
        guard.owe(["t:users"])  # another thread's failed bump, mid-payment

    rig.backend.real.bump = bump_while_another_commit_fails  # type: ignore[method-assign]
    rig.guard.get("k")  # pays
    assert guard.owed_tags() == ["t:users"], "the newer debt was struck off"
    rig.backend.real.bump = real_bump  # type: ignore[method-assign]
    rig.guard.get("k")
    assert guard.owed_tags() == []
