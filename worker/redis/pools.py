"""``State``'s part for pools: the providers that left a batch's pool (402, 401/403: for good)
and each provider's breaker, shared by every worker (``health.lua``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from worker.redis import keys
from worker.redis.scripts import Scripted


@dataclass(frozen=True)
class Breaker:
    """When a failing provider cools down, and for how long (``IMAGEBATCH_BREAKER_*``)."""

    failures: int
    cooldown_s: float
    max_s: float


@dataclass(frozen=True)
class Health:
    """A provider's breaker as Redis holds it: cooling down until ``until`` (0: healthy), its
    probe line out until ``probe``, ``failures`` in a row so far."""

    until: float = 0.0
    probe: float = 0.0
    failures: int = 0

    def state(self, now: float) -> str:
        """``healthy``, ``cooling`` (no submits), ``probing`` (one line out), or ``cooled``
        (its next line is the probe)."""
        if not self.until:
            return "healthy"
        if now < self.until:
            return "cooling"
        return "probing" if now < self.probe else "cooled"

    def describe(self, now: float) -> str:
        if not self.until:
            return "healthy"
        if now < self.until:
            return f"cooling down until {time.strftime('%H:%M:%S', time.localtime(self.until))}"
        return "probing" if now < self.probe else "cooled down: the next line is its probe"


class Pools(Scripted):
    """Pool membership and provider health (a part of ``State``)."""

    def note_provider(self, provider: str) -> None:
        """``provider`` has lines in the window (a line moved to it): the scheduler pumps it."""
        self.client.sadd(keys.PROVIDERS, provider)

    def leave_pool(self, b: str, provider: str, reason: str) -> bool:
        """Take ``provider`` out of the batch's pool for good; True the first time."""
        return bool(self.client.hsetnx(keys.out(b), provider, reason))

    def out_of_pool(self, b: str) -> dict[str, str]:
        """The providers that left the batch's pool, each with why."""
        return dict(self.client.hgetall(keys.out(b)))

    def verdict(self, provider: str, ok: bool, now: float, breaker: Breaker) -> str:
        """Count one submit's outcome toward the provider's breaker (``health.lua``); returns
        ``cooling <until>`` when a cooldown starts, ``healthy`` when an answer ends one."""
        return str(
            self._run(
                "health",
                [keys.health(provider)],
                [
                    repr(now),
                    "1" if ok else "0",
                    breaker.failures,
                    breaker.cooldown_s,
                    breaker.max_s,
                ],
            )
        )

    def health(self, provider: str) -> Health:
        found = self.client.hmget(keys.health(provider), ["until", "probe", "failures"])
        until, probe, failures = (float(v or 0) for v in found)
        return Health(until, probe, int(failures))
