"""A circuit breaker, so a dead or hanging backend costs one timeout, not one per call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Closed → open after ``threshold`` consecutive failures → half-open after ``cooldown``.

    While open, callers skip the backend entirely and go straight to the database, so a
    backend that hangs until its read timeout cannot add that timeout to every request.
    After the cool-down one caller probes; success closes the breaker, failure re-opens it.

    ``clock`` (monotonic seconds) is a parameter so the cool-down can be tested by moving
    a clock by hand instead of sleeping (``tests/test_breaker.py``).
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_lock",
        "_opened_at",
        "_probe_at",
        "_slow_at",
        "cooldown",
        "threshold",
    )

    def __init__(
        self,
        *,
        threshold: int = 3,
        cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        # When the probe under way was granted (None: none is): a probe whose call never
        # reported back (a task cancelled mid-call) expires after a cool-down of its own.
        self._probe_at: float | None = None
        self._slow_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """True if the caller may use the backend now."""
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            now = self._clock()
            if now - self._opened_at < self.cooldown:
                return False
            if self._probe_at is not None and now - self._probe_at < self.cooldown:
                return False
            # Exactly one caller probes a half-open breaker.
            self._probe_at = now
            return True

    def end_probe(self) -> None:
        """The probe that :meth:`allow` granted made no call after all: the next caller
        past the cool-down may probe."""
        if self._probe_at is not None:
            with self._lock:
                self._probe_at = None

    def success(self) -> None:
        """The backend answered: close the breaker and start counting failures afresh."""
        if self._failures or self._opened_at is not None:
            with self._lock:
                self._failures = 0
                self._opened_at = None
                self._probe_at = None

    def skips_writes(self) -> bool:
        """Whether invalidations skip the backend too (and are owed): the breaker is open
        and a failure within the cool-down made its caller wait (a timeout).

        A backend that fails at once (a refused connection: Redis restarting) is still
        tried, since trying costs nothing: were it skipped, a commit made after Redis
        came back would go uninvalidated until the cool-down ends, while other
        processes, whose breakers closed first, stored and served what it changed.
        """
        if self.allow():
            return False
        slow_at = self._slow_at
        return slow_at is not None and self._clock() - slow_at < self.cooldown

    def failure(self, *, slow: bool = False) -> bool:
        """Record a failure (``slow``: it made the caller wait); True if this failure
        opened (or re-opened) the breaker."""
        with self._lock:
            if slow:
                self._slow_at = self._clock()
            self._failures += 1
            self._probe_at = None
            if self._failures >= self.threshold:
                self._opened_at = self._clock()
                return True
            return False
