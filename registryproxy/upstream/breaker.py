"""A circuit breaker per upstream: a dead registry costs clients milliseconds.

After ``threshold`` failures in a row (no connection, no answer, 5xx) the
circuit opens: requests fail at once, so stale content is served straight
away instead of after a timeout each.  After ``cooldown`` seconds one request
is let through to try; success closes the circuit, failure opens it again
for twice as long (up to ten times the cooldown).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class CircuitOpen(Exception):
    def __init__(self, retry_in: float) -> None:
        super().__init__(retry_in)
        self.retry_in = retry_in


class CircuitBreaker:
    def __init__(self, clock: IReactorTime, threshold: int = 5, cooldown: float = 30.0) -> None:
        self._clock = clock
        self._threshold = threshold
        self._cooldown = cooldown
        self._failures = 0
        self._open_for = cooldown
        self._open_until: float | None = None
        self._trial = False

    def check(self) -> None:
        """Raise :class:`CircuitOpen` unless a request may go out now."""
        if self._open_until is None or self._threshold == 0:
            return
        now = self._clock.seconds()
        if now < self._open_until or self._trial:
            raise CircuitOpen(max(0.0, self._open_until - now))
        self._trial = True  # half open: this request is the one try

    def is_open(self) -> bool:
        """Whether requests are being refused now (:meth:`check` would raise
        for a new one); unlike it, this does not take the half-open trial."""
        if self._open_until is None or self._threshold == 0:
            return False
        return self._clock.seconds() < self._open_until

    def succeeded(self) -> None:
        self._failures = 0
        self._open_until = None
        self._open_for = self._cooldown
        self._trial = False

    def failed(self) -> None:
        self._failures += 1
        if self._trial:
            self._trial = False
            self._open_for = min(self._open_for * 2, self._cooldown * 10)
            self._open_until = self._clock.seconds() + self._open_for
        elif self._threshold and self._failures >= self._threshold:
            self._open_until = self._clock.seconds() + self._open_for
