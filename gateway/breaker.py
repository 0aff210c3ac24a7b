"""A circuit breaker per downstream service.

CLOSED: calls go through; `threshold` consecutive UNAVAILABLE failures open it.
OPEN: calls fail fast (no load on a service that is down) until `cooldown` has passed
or the health monitor sees the service SERVING again, then HALF_OPEN.
HALF_OPEN: one trial call; success closes, failure opens again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from videomesh.errors import Unavailable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class CircuitBreaker:
    name: str
    threshold: int = 3
    cooldown: float = 10.0
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    transitions: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _trial: bool = False

    def before_call(self) -> None:
        with self._lock:
            if self.state == OPEN and time.monotonic() - self.opened_at >= self.cooldown:
                self._set(HALF_OPEN)
            if self.state == OPEN:
                left = self.cooldown - (time.monotonic() - self.opened_at)
                raise Unavailable(f"{self.name} is unavailable (circuit open); retry later", retry_after=max(0.5, left),
                                  reason="CIRCUIT_OPEN")  # fmt: skip
            if self.state == HALF_OPEN:
                if self._trial:
                    raise Unavailable(
                        f"{self.name} is being probed (circuit half-open)",
                        retry_after=1.0,
                        reason="CIRCUIT_OPEN",
                    )
                self._trial = True

    def success(self) -> None:
        with self._lock:
            self.failures = 0
            self._trial = False
            if self.state != CLOSED:
                self._set(CLOSED)

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            self._trial = False
            if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
                self.opened_at = time.monotonic()
                self._set(OPEN)

    def healthy(self) -> None:
        """The health monitor saw the service SERVING: let the next call probe it."""
        with self._lock:
            if self.state == OPEN:
                self._set(HALF_OPEN)

    def _set(self, state: str) -> None:
        self.state = state
        self.transitions.append(state)
